"""The stage services called directly through Serve's gRPC proxy, and the work streams'
exactly-once delivery as the deployed decoder and vocoder replicas run them."""
from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from baichuan_audio.v1 import stages_pb2, stages_pb2_grpc
from services.common import entries as E
from services.common.bus import Bus
from services.decoder.runner import MAX_FRAMES
from tests.conftest import metadata


@pytest.fixture(scope="module")
def channel(serve_stack):
    for app in ("tokenizer", "llm", "decoder", "vocoder", "conversation"):
        serve_stack.deploy(app)
    ch = grpc.insecure_channel(serve_stack.address)
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def cfg(serve_stack):
    from services.common.model_config import ModelConfig
    return ModelConfig.from_file(serve_stack.checkpoint)


@pytest.fixture(scope="module")
def hift(serve_stack):
    from services.common.checkpoint import Checkpoint
    return Checkpoint(serve_stack.checkpoint).hift_config()


def index_after(seq: list[int], sub: list[int], start: int) -> int:
    """Where `sub` occurs in `seq` at or after `start` (-1 if it does not)."""
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return -1


def codes_msg(codes: np.ndarray) -> stages_pb2.Codes:
    return stages_pb2.Codes(frames=codes.shape[0], codebooks=codes.shape[1], values=codes.flatten().tolist())


def random_codes(cfg, frames: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, k, frames) for k in cfg.audio.codebook_sizes], axis=1)


def test_llm_generate_streams_a_tts_reply(channel, cfg, serve_stack):
    from services.common.checkpoint import Checkpoint
    from services.common.text_tokenizer import load_text_tokenizer
    from services.llm.prompts import PromptBuilder, ProtocolTokens, split_tts_text

    ckpt = Checkpoint(serve_stack.checkpoint)
    tok = load_text_tokenizer(ckpt.path)
    builder = PromptBuilder(tok, ProtocolTokens.from_tokenizer(tok, cfg, ckpt.generation_config()),
                            cfg.audio.num_codebooks)
    text = "你好，欢迎收听今天的节目。我们马上开始！先听一段音乐，然后再聊天气。"
    texts, chunks = split_tts_text(text), builder.tts_chunks(text)
    assert len(texts) >= 3
    stub = stages_pb2_grpc.LLMStub(channel)
    events = list(stub.Generate(stages_pb2.GenerateRequest(
        mode=stages_pb2.GENERATE_MODE_TTS, prompt_ids=chunks[0], tts_chunks=texts[1:]),
        metadata=metadata("internal", "llm"), timeout=120))
    frames = [e.frames for e in events if e.HasField("frames")]
    assert frames and all(len(f.codes.values) == cfg.audio.num_codebooks for f in frames)
    assert events[-1].HasField("done")
    seq = list(events[-1].done.sequence)
    assert seq[:len(chunks[0])] == chunks[0]
    # every later chunk was tokenized and appended after the previous chunk's audio, in order
    at = len(chunks[0])
    for k, ids in enumerate(chunks[1:], 1):
        i = index_after(seq, ids, at)
        assert i > at, f"chunk {k} ({texts[k]!r}) missing from the sequence, or not after chunk {k - 1}'s audio"
        at = i + len(ids)


def llm_status(request_id: str) -> str:
    """The LLM replica's view of a request: "running", its Done reason, or "unknown"."""
    from ray import serve
    return serve.get_app_handle("llm").request_status.remote(request_id).result(timeout_s=30)


def test_llm_generate_is_cancelled_when_the_caller_leaves(channel, cfg, serve_stack):
    """A direct LLM.Generate whose caller cancels mid-stream ends in the engine within a moment
    (Done reason "cancelled"), instead of running to its length limit holding a KV slot."""
    from services.common.checkpoint import Checkpoint
    from services.common.text_tokenizer import load_text_tokenizer
    from services.llm.prompts import PromptBuilder, ProtocolTokens

    ckpt = Checkpoint(serve_stack.checkpoint)
    tok = load_text_tokenizer(ckpt.path)
    builder = PromptBuilder(tok, ProtocolTokens.from_tokenizer(tok, cfg, ckpt.generation_config()),
                            cfg.audio.num_codebooks)
    # 300 TTS chunks, each spoken until its end of audio: minutes of generation on the tiny model
    texts = [f"这是第{i}句话，我们继续说下去。" for i in range(300)]
    turn = f"gen-cancel-{time.time_ns()}"
    call = stages_pb2_grpc.LLMStub(channel).Generate(stages_pb2.GenerateRequest(
        mode=stages_pb2.GENERATE_MODE_TTS, turn_id=turn, prompt_ids=builder.tts_chunk(texts[0]),
        tts_chunks=texts[1:]), metadata=metadata("internal", "llm"), timeout=120)
    got = [next(call) for _ in range(5)]
    assert all(not e.HasField("done") for e in got)
    assert llm_status(turn) == "running"
    call.cancel()                                   # the caller goes away
    deadline = time.monotonic() + 5
    while (status := llm_status(turn)) == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status == "cancelled", f"the engine request is {status!r} after its caller left"


def test_decode_and_vocode_directly(channel, cfg, hift):
    from services.decoder.runner import mel_frames

    n = 6
    codes = random_codes(cfg, n)
    mel = stages_pb2_grpc.DecoderStub(channel).Decode(stages_pb2.DecodeRequest(codes=codes_msg(codes), seed=3),
                                                      metadata=metadata("internal", "decoder"), timeout=60).mel
    assert (mel.rows, mel.cols) == (cfg.flow.in_channels, mel_frames(n, cfg.audio.avg_pooler))
    r = stages_pb2_grpc.VocoderStub(channel).Vocode(stages_pb2.VocodeRequest(mel=mel, seed=3),
                                                     metadata=metadata("internal", "vocoder"), timeout=60)
    assert r.sample_rate == hift.sampling_rate and len(r.pcm16) == 2 * hift.hop_samples * mel.cols


@pytest.mark.parametrize("frames, fix, words", [
    (0, None, "no codes"),
    (4, lambda c, cfg: c.__setitem__((1, 2), cfg.audio.codebook_sizes[2] + 5), "out of range"),
    (4, lambda c, cfg: c.__setitem__((1, 0), cfg.audio.codebook_sizes[0]), "end-of-audio"),
    (MAX_FRAMES + 1, None, "limit"),
])
def test_decoder_bad_codes_are_invalid_argument(channel, cfg, frames, fix, words):
    codes = random_codes(cfg, frames) if frames else np.zeros((0, cfg.audio.num_codebooks), np.int64)
    if fix:
        fix(codes, cfg)
    with pytest.raises(grpc.RpcError) as e:
        stages_pb2_grpc.DecoderStub(channel).Decode(stages_pb2.DecodeRequest(codes=codes_msg(codes)),
                                                    metadata=metadata("internal", "decoder"), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in e.value.details()


@pytest.mark.parametrize("codebooks", ["given", "omitted"])
def test_decoder_codes_that_do_not_fill_their_frames_are_invalid_argument(channel, cfg, codebooks):
    """Omitted (0), the number of codebooks is the model's, and the values must still fill the frames."""
    books = cfg.audio.num_codebooks
    codes = stages_pb2.Codes(frames=2, codebooks=books if codebooks == "given" else 0, values=[1] * (2 * books + 1))
    with pytest.raises(grpc.RpcError) as e:
        stages_pb2_grpc.DecoderStub(channel).Decode(stages_pb2.DecodeRequest(codes=codes),
                                                    metadata=metadata("internal", "decoder"), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"codes say 2x{books} but carry {2 * books + 1} values" in e.value.details()


def test_vocoder_bad_mel_is_invalid_argument(channel, hift):
    bad = stages_pb2.Tensor2D(rows=hift.in_channels, cols=3, float32_le=b"\x00" * 7)   # 7 bytes: not floats
    with pytest.raises(grpc.RpcError) as e:
        stages_pb2_grpc.VocoderStub(channel).Vocode(stages_pb2.VocodeRequest(mel=bad),
                                                     metadata=metadata("internal", "vocoder"), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_job_delivered_twice_is_published_once(channel, cfg, hift, serve_stack):
    """The same decode job submitted twice (a re-delivery after a crash looks like this to the
    stages) reaches the turn's audio stream exactly once, through both stages."""
    bus = Bus(serve_stack.redis_url)
    turn = f"dup-{time.time_ns()}"
    job = E.DecodeJob.from_codes(turn, 0, 0, random_codes(cfg, 5, seed=1).astype(np.int32), seed=11)
    bus.submit(E.DECODER_JOBS, job)
    bus.submit(E.DECODER_JOBS, job)
    stream = bus.turn_stream(turn, "audio")
    deadline = time.time() + 60
    got = []
    while time.time() < deadline and not got:
        got = [m for m in bus.read({stream: "0"}, block_ms=500) if isinstance(m.entry, E.PcmChunk)]
    time.sleep(2.0)  # give the duplicate every chance to arrive
    got = [m for m in bus.read({stream: "0"}) if isinstance(m.entry, E.PcmChunk)]
    assert len(got) == 1
    from services.decoder.runner import mel_frames
    assert got[0].entry.samples == hift.hop_samples * mel_frames(5, cfg.audio.avg_pooler)


def test_one_trace_spans_the_stages(channel, serve_stack):
    """Every stream entry of a turn carries the W3C context of the turn's trace (seen as the
    stages write them: the turn's stage streams are deleted when it ends)."""
    from baichuan_audio.v1 import conversation_pb2 as pb
    from baichuan_audio.v1 import conversation_pb2_grpc as pb_grpc
    from tests.orchestrator.redis_monitor import Monitor
    from tests.orchestrator.test_service import META, QUESTION

    stub = pb_grpc.ConversationServiceStub(channel)
    sid = stub.CreateSession(pb.CreateSessionRequest(), metadata=META, timeout=30).session_id
    req = pb.ConverseRequest(session_id=sid)
    req.audio.file = QUESTION.read_bytes()
    mon = Monitor(serve_stack.redis_url)
    try:
        turn = [e for e in stub.Converse(req, metadata=META, timeout=180)][-1].turn_id
    finally:
        mon.close()
    ids = set()
    for kind in ("llm", "audio"):
        adds = [c for c in mon.writes_to(f"turn:{turn}:{kind}") if c[0] == "xadd"]
        assert adds, f"no {kind} entries seen"
        for c in adds:
            tp = c[c.index("traceparent") + 1] if "traceparent" in c else ""
            assert tp, f"{kind} entry {c[c.index('type') + 1]} without trace context"
            ids.add(tp.split("-")[1])
    assert len(ids) == 1


def test_a_turns_first_audio_takes_the_urgent_lanes(channel, serve_stack):
    """The turn's first decode job goes to jobs:decoder:urgent, its mel to jobs:vocoder:urgent;
    every later piece (low-latency chunks here) to the plain streams (seen in Redis as the
    stages write them)."""
    from baichuan_audio.v1 import conversation_pb2 as pb
    from baichuan_audio.v1 import conversation_pb2_grpc as pb_grpc
    from tests.orchestrator.redis_monitor import Monitor
    from tests.orchestrator.test_service import META, QUESTION

    stub = pb_grpc.ConversationServiceStub(channel)
    sid = stub.CreateSession(pb.CreateSessionRequest(settings=pb.SessionSettings(low_latency_audio=True)),
                             metadata=META, timeout=30).session_id
    req = pb.ConverseRequest(session_id=sid)
    req.audio.file = QUESTION.read_bytes()
    mon = Monitor(serve_stack.redis_url)
    try:
        events = list(stub.Converse(req, metadata=META, timeout=180))
    finally:
        mon.close()
    turn = events[-1].turn_id

    def pieces(stream: str) -> list[tuple[str, str]]:
        out = []
        for c in mon.writes_to(stream):
            if c[0] in ("xadd", "evalsha", "eval") and turn in c:
                out.append((c[c.index("segment") + 1], c[c.index("chunk") + 1]))
        return out
    for stage in ("decoder", "vocoder"):
        urgent, rest = pieces(f"jobs:{stage}:urgent"), pieces(f"jobs:{stage}")
        assert urgent == [("0", "0")], (stage, urgent)
        assert rest and ("0", "0") not in rest, (stage, rest)


def test_standard_health_check(channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                  metadata=(("application", "conversation"),), timeout=30)
    assert r.status == health_pb2.HealthCheckResponse.SERVING
