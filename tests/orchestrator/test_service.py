"""The whole stack as users run it: real Ray Serve apps, real redis-server, real gRPC through
Serve's proxy, the tiny checkpoint, the bundled spoken question."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from baichuan_audio.v1 import conversation_pb2 as pb
from baichuan_audio.v1 import conversation_pb2_grpc as pb_grpc
from tests.common.test_grpc_status import assert_clean
from tests.conftest import metadata

QUESTION = Path(__file__).resolve().parents[2] / "orchestrator" / "samples" / "question.wav"
META = metadata("alice")
TIMEOUT = 180


@pytest.fixture(scope="module")
def stub(serve_stack):
    for app in ("tokenizer", "llm", "decoder", "vocoder", "conversation"):
        serve_stack.deploy(app)
    channel = grpc.insecure_channel(serve_stack.address)
    yield pb_grpc.ConversationServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def rate(serve_stack) -> int:
    """The reply's sample rate: the served checkpoint's vocoder rate."""
    from services.common.checkpoint import Checkpoint
    return Checkpoint(serve_stack.checkpoint).hift_config().sampling_rate


def session(stub, **settings) -> str:
    return stub.CreateSession(pb.CreateSessionRequest(settings=pb.SessionSettings(**settings)),
                              metadata=META, timeout=30).session_id


def converse(stub, sid: str, *, text: str | None = None, audio: bytes | None = None):
    req = pb.ConverseRequest(session_id=sid)
    if text is not None:
        req.text = text
    else:
        req.audio.file = audio if audio is not None else QUESTION.read_bytes()
    return list(stub.Converse(req, metadata=META, timeout=TIMEOUT))


def check_turn(events: list[pb.TurnEvent], spoken: bool = True, rate: int | None = None) -> tuple[pb.EndOfTurn, bytes]:
    """One well-formed turn. rate: the served vocoder's sample rate (default: whatever the
    first audio chunk says; every chunk and the end's length must agree with it)."""
    assert events, "no events"
    turn_ids = {e.turn_id for e in events}
    assert len(turn_ids) == 1 and "" not in turn_ids
    ids = [e.event_id for e in events]
    assert len(set(ids)) == len(ids) and all(ids)
    assert events[-1].HasField("end"), events[-1]
    end = events[-1].end
    assert sum(e.HasField("end") for e in events) == 1
    audio = [e.audio for e in events if e.HasField("audio")]
    assert [a.sequence for a in audio] == list(range(len(audio)))   # gap-free, ordered
    pcm = b"".join(a.pcm16 for a in audio)
    rate = rate or (audio[0].sample_rate if audio else 1)
    assert all(a.sample_rate == rate for a in audio)
    assert end.audio_seconds == pytest.approx(len(pcm) / 2 / rate, abs=1e-6)
    text = "".join(e.text.text for e in events if e.HasField("text"))
    assert end.text == text
    if spoken:
        assert audio, "a spoken reply without audio"
        assert any(e.HasField("timing") and e.timing.name == "first_audio" for e in events)
    else:
        assert not audio
    return end, pcm


def test_two_turn_spoken_conversation(stub, tmp_path, rate):
    sid = session(stub)
    end1, pcm1 = check_turn(converse(stub, sid), rate=rate)
    end2, pcm2 = check_turn(converse(stub, sid), rate=rate)
    assert end1.reason == end2.reason == "complete"
    # the reply written as a wav has the announced length
    from services.common.audio import wav_bytes
    import soundfile as sf
    out = tmp_path / "reply.wav"
    out.write_bytes(wav_bytes(pcm2, rate))
    info = sf.info(str(out))
    assert info.samplerate == rate and info.frames / rate == pytest.approx(end2.audio_seconds)
    s = stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=META, timeout=30)
    assert s.turns == 2
    assert [h.role for h in s.history] == ["user", "assistant", "user", "assistant"]
    assert s.history[3].text == end2.text


def test_text_turns_and_text_only_replies(stub):
    sid = session(stub, reply_mode=pb.REPLY_MODE_TEXT)
    end, _ = check_turn(converse(stub, sid, text="Hello, how are you?"), spoken=False)
    assert end.reason == "complete"


@pytest.fixture(scope="module")
def direct(serve_stack):
    """The served checkpoint's tokenizer runner, engine and prompt builder in this process: what
    the stack must reproduce, computed without it."""
    import types

    from services.common.checkpoint import Checkpoint
    from services.common.text_tokenizer import load_text_tokenizer
    from services.llm.engine import Engine, EngineConfig
    from services.llm.model import AudioLLM
    from services.llm.prompts import PromptBuilder, ProtocolTokens
    from services.tokenizer.runner import TokenizerRunner

    ckpt = Checkpoint(serve_stack.checkpoint)
    cfg, tok = ckpt.config, load_text_tokenizer(ckpt.path)
    engine = Engine(AudioLLM.from_checkpoint(ckpt, dtype=torch.float32, device=torch.device("cpu")), tok,
                    generation_config=ckpt.generation_config(),
                    config=EngineConfig(num_slots=2, max_len=cfg.llm.max_position_embeddings))
    prompts = PromptBuilder(tok, ProtocolTokens.from_tokenizer(tok, cfg, ckpt.generation_config()),
                            cfg.audio.num_codebooks)
    return types.SimpleNamespace(tokenizer=TokenizerRunner.from_checkpoint(ckpt, device="cpu"), engine=engine,
                                 prompts=prompts, cfg=cfg, hift=ckpt.hift_config())


def run_direct(engine, request) -> list:
    """The engine's events for one request, stepped here."""
    h = engine.submit(request)
    engine.run_until_idle()
    return h.drain()


def test_asr_and_tts_round_trip(stub, direct):
    from services.llm.protocol import Request, TextToken
    from services.tokenizer.audio_io import read_audio

    r = stub.Transcribe(pb.TranscribeRequest(audio=pb.AudioInput(file=QUESTION.read_bytes())),
                        metadata=META, timeout=TIMEOUT)
    import soundfile as sf
    assert r.audio_seconds == pytest.approx(sf.info(str(QUESTION)).duration, abs=0.01)
    # the text is what the tiny model says for the sample, greedy, computed here without the stack
    (codes,) = direct.tokenizer.tokenize([read_audio(QUESTION.read_bytes())])
    prompt = direct.prompts.asr(codes)
    events = run_direct(direct.engine, Request(prompt_ids=prompt.ids, mode="asr", audio_codes=prompt.audio_codes,
                                               greedy=True))
    expected = "".join(e.text for e in events if isinstance(e, TextToken))
    assert expected and r.text == expected
    events = list(stub.Synthesize(pb.SynthesizeRequest(text="你好，欢迎收听今天的节目。我们马上开始！"),
                                  metadata=META, timeout=TIMEOUT))
    end, pcm = check_turn(events)
    assert len(pcm) > 0


def test_bad_requests_get_precise_status(stub):
    with pytest.raises(grpc.RpcError) as e:
        converse(stub, "no-such-session", text="hi")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    sid = session(stub)
    with pytest.raises(grpc.RpcError) as e:
        converse(stub, sid, audio=b"not audio at all")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # raised in the tokenizer replica: the caller reads the tokenizer's message, not Ray's traceback
    assert "WAV or FLAC" in e.value.details()
    assert_clean(e.value.details())
    with pytest.raises(grpc.RpcError) as e:
        stub.Synthesize(pb.SynthesizeRequest(text=""), metadata=META, timeout=30).next()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # the failed turn released the session: it still works
    check_turn(converse(stub, sid, text="Hello"))


def test_resume_after_a_dropped_client(stub):
    sid = session(stub)
    req = pb.ConverseRequest(session_id=sid)
    req.audio.file = QUESTION.read_bytes()
    call = stub.Converse(req, metadata=META, timeout=TIMEOUT)
    first = [next(call), next(call)]
    call.cancel()                                   # the client goes away mid-turn
    rest = list(stub.Converse(pb.ConverseRequest(session_id=sid, resume_turn_id=first[-1].turn_id,
                                                 after_event_id=first[-1].event_id),
                              metadata=META, timeout=TIMEOUT))
    check_turn(first + rest)                        # no loss, no duplicates, gap-free audio


LONG_REPLIES: dict = {}      # (text, sampling, min_frames) -> long_reply's answer: the test checkpoint is fixed


def long_reply(direct, text: str, sampling: dict, min_frames: int = 40) -> tuple[int, float]:
    """(seed, seconds of reply audio) of the first sampling seed for which the tiny model's spoken
    reply to the typed turn `text` of a new session has at least `min_frames` audio frames (its
    replies usually end within a few), found with the engine here (once per test session)."""
    key = (text, tuple(sorted(sampling.items())), min_frames)
    if key not in LONG_REPLIES:
        LONG_REPLIES[key] = _long_reply(direct, text, sampling, min_frames)
    return LONG_REPLIES[key]


def _long_reply(direct, text: str, sampling: dict, min_frames: int) -> tuple[int, float]:
    from services.common.text_tokenizer import DEFAULT_SYSTEM_PROMPT
    from services.decoder.runner import mel_frames
    from services.llm.prompts import Message
    from services.llm.protocol import Request, SegmentEnd

    prompt = direct.prompts.chat([Message("system", DEFAULT_SYSTEM_PROMPT), Message("user", text)], spoken=True)
    for seed in range(40):
        events = run_direct(direct.engine, Request(prompt_ids=prompt.ids, mode="spoken", seed=seed, sampling=sampling))
        segments = [len(e.codes) for e in events if isinstance(e, SegmentEnd) and e.kind == "audio"]
        if sum(segments) >= min_frames:
            hop, rate = direct.hift.hop_samples, direct.hift.sampling_rate
            return seed, sum(mel_frames(n, direct.cfg.audio.avg_pooler) * hop for n in segments) / rate
    raise AssertionError(f"no seed below 40 gives a reply of {min_frames} frames to interrupt")


def test_interrupt_stops_the_turn(stub, direct):
    """A reply seconds long (a seed for which the tiny model speaks long), interrupted after its
    first event: the turn ends as interrupted, before its audio, and the history keeps what was sent."""
    seed, full_seconds = long_reply(direct, "Hello", {"audio_temperature": 2.0})
    sid = session(stub, sampling=pb.SamplingOverrides(audio_temperature=2.0, seed=seed))
    events: list[pb.TurnEvent] = []
    started = threading.Event()

    def run():
        for ev in stub.Converse(pb.ConverseRequest(session_id=sid, text="Hello"), metadata=META, timeout=TIMEOUT):
            events.append(ev)
            started.set()

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(TIMEOUT)
    r = stub.Interrupt(pb.InterruptRequest(session_id=sid), metadata=META, timeout=30)
    t.join(TIMEOUT)
    assert r.interrupted and r.turn_id == events[0].turn_id
    end = events[-1].end
    assert end.reason == "interrupted"
    assert end.audio_seconds < full_seconds / 2, (end.audio_seconds, full_seconds)
    s = stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=META, timeout=30)
    assert s.history[-1].interrupted
    delivered = "".join(e.text.text for e in events if e.HasField("text"))
    assert s.history[-1].text == delivered
    # the session takes the next turn
    check_turn(converse(stub, sid, text="Hello"))


def test_parallel_sessions_never_see_each_others_events(stub):
    sids = [session(stub) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda s: converse(stub, s), sids))
    turn_ids = [{e.turn_id for e in evs} for evs in results]
    assert all(len(t) == 1 for t in turn_ids) and turn_ids[0] != turn_ids[1]
    for evs in results:
        check_turn(evs)


def test_reflection_client_lists_and_calls_the_service(serve_stack, stub):
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    channel = grpc.insecure_channel(serve_stack.address)
    db = ProtoReflectionDescriptorDatabase(channel)
    services = db.get_services()
    assert "baichuan_audio.v1.ConversationService" in services
    pool = descriptor_pool.DescriptorPool(db)
    svc = pool.FindServiceByName("baichuan_audio.v1.ConversationService")
    method = svc.methods_by_name["CreateSession"]
    req_cls = message_factory.GetMessageClass(method.input_type)
    resp_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(f"/{svc.full_name}/{method.name}", request_serializer=req_cls.SerializeToString,
                               response_deserializer=resp_cls.FromString)
    resp = call(req_cls(), metadata=META, timeout=30)
    assert len(resp.session_id) == 32
    channel.close()


def test_faithful_history_re_encodes_the_assistant_audio(stub, serve_stack):
    import json

    import redis

    sid = session(stub, faithful_history=True)
    events1 = converse(stub, sid)
    end1, pcm1 = check_turn(events1)
    end2, _ = check_turn(converse(stub, sid))
    assert end1.reason == end2.reason == "complete"
    turns = json.loads(redis.Redis.from_url(serve_stack.redis_url).get(f"session:alice:{sid}:faithful"))
    assert len(turns) == 2 and "codes" in turns[0]["user"]
    first = turns[0]["assistant"]
    # every segment of turn 1 that had audio was re-encoded from its waveform for turn 2, and
    # only its codes are kept; turn 2's waveform waits for the next turn
    spoken = sorted({e.audio.segment for e in events1 if e.HasField("audio")})
    assert spoken and [k for k, s in enumerate(first) if "codes" in s] == spoken
    assert not any(s.get("pcm16") for s in first)
    assert any(s.get("pcm16") for s in turns[1]["assistant"])
    assert "".join(s["text"] for s in first) == end1.text


def test_low_latency_audio_streams_chunks_in_order(stub):
    sid = session(stub, low_latency_audio=True)
    events = converse(stub, sid)
    end, pcm = check_turn(events)
    assert end.reason == "complete"
    # the first audio segment came as several chunks (4-frame first chunk of a 5-frame segment)
    first_seg = [e.audio for e in events if e.HasField("audio") and e.audio.segment == 0]
    assert len(first_seg) >= 2


def test_oversized_message_is_resource_exhausted(stub, serve_stack):
    """Serve's gRPC proxy caps messages at limits.max_message_bytes of the settings file, which
    reaches it the way `baichuan-audio serve` passes it (start_serve; the k8s manifests: see
    tests/k8s): over the cap, RESOURCE_EXHAUSTED from gRPC; under it, the request reaches the
    tokenizer."""
    from services.common.settings import Settings

    cap = Settings.load(str(serve_stack.settings_path)).limits.max_message_bytes
    assert cap > 6 * 1024 * 1024
    sid = session(stub)
    with pytest.raises(grpc.RpcError) as e:
        converse(stub, sid, audio=b"\0" * (cap + 1024))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as e:
        converse(stub, sid, audio=b"\0" * (cap - 64 * 1024))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "WAV or FLAC" in e.value.details()
    check_turn(converse(stub, sid, text="Hello"))   # the service and the session are fine


def test_sampling_overrides_within_limits(stub):
    sid = session(stub, sampling=pb.SamplingOverrides(text_temperature=0.5, audio_top_k=3, seed=7))
    check_turn(converse(stub, sid))
    with pytest.raises(grpc.RpcError) as e:
        session(stub, sampling=pb.SamplingOverrides(text_temperature=5.0))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text_temperature" in e.value.details()


def test_a_turn_abandoned_by_a_dead_replica_does_not_block_the_session(stub, serve_stack):
    import redis

    from services.common.entries import ClientEvent

    sid = session(stub)
    r = redis.Redis.from_url(serve_stack.redis_url)
    # a turn whose orchestrator replica died: marked running, events sent, nobody holds its lease
    ghost = "ghost-turn"
    r.hset(f"session:alice:{sid}", "active_turn", ghost)
    r.xadd(f"turn:{ghost}:events", ClientEvent(turn_id=ghost, payload=b"").encode())
    check_turn(converse(stub, sid, text="Hello"))
    # one that died before its first event (nothing but the mark) does not block the session either
    r.hset(f"session:alice:{sid}", "active_turn", "ghost-before-its-first-event")
    check_turn(converse(stub, sid, text="Hello"))
    # while a turn really runs (its producer holds the lease), a second one is refused
    r.hset(f"session:alice:{sid}", "active_turn", "live-turn")
    r.set("turn:live-turn:lease:producer", b"1", ex=60)
    with pytest.raises(grpc.RpcError) as e:
        converse(stub, sid, text="Hello again")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "running turn" in e.value.details()
