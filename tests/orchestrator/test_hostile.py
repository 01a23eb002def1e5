"""Hostile input, generated (hypothesis) against the served stack: audio bytes, every field of the
public messages, session ids, event ids and text, plus oversized messages and stalled callers.

Every case must get a precise status with a message (never UNKNOWN or INTERNAL, never a
traceback), a turn of another session running meanwhile must complete, and no process of the
stack may die. Examples are few and derandomized (CI time; the same cases every run); each test
prints how many cases it tried."""
from __future__ import annotations

import io
import threading
import wave
from collections import Counter

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from baichuan_audio.v1 import conversation_pb2 as pb
from baichuan_audio.v1 import conversation_pb2_grpc as pb_grpc
from orchestrator.load import check_turn as stream_problems, stack_processes
from tests.conftest import metadata
from tests.orchestrator.test_service import QUESTION, TIMEOUT, stub  # noqa: F401 (fixture)

MD = metadata("hostile")
OTHER = metadata("bob")
C = grpc.StatusCode
NEVER = {C.UNKNOWN, C.INTERNAL}
FEW = settings(max_examples=25, deadline=None, derandomize=True, database=None,
               suppress_health_check=list(HealthCheck))
TURNS = settings(FEW, max_examples=12)          # each case runs (or refuses) a whole turn
tried: Counter = Counter()
# protobuf strings are UTF-8: text without lone surrogates (the client library refuses those)
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
SPECIAL = st.sampled_from(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<audio_start_baichuan>",
                           "<audiotext_start_baichuan>", "\x00", "\u202e", "💥" * 50, "a" * 5000, ""])
IDS = st.one_of(TEXT, SPECIAL, st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
                st.from_regex(r"[A-Za-z0-9_-]{1,80}", fullmatch=True), st.just("X:faithful"), st.just("*"))


def outcome(call, allowed: set) -> "grpc.StatusCode":
    """Run `call`; its status must be OK or one of `allowed`, never UNKNOWN/INTERNAL, and an
    error must say something a person can act on (not a traceback)."""
    try:
        call()
        return C.OK
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        assert code not in NEVER, f"{code.name}: {details}"
        assert code in allowed, f"{code.name}: {details}"
        assert details and "Traceback" not in details and 'File "' not in details, details
        return code


def turn(stub, sid: str, md=MD, **fields) -> list[pb.TurnEvent]:
    """One Converse to its end; a turn's own error event must carry a precise code too."""
    events = list(stub.Converse(pb.ConverseRequest(session_id=sid, **fields), metadata=md, timeout=TIMEOUT))
    for ev in events:
        if ev.HasField("error"):
            assert ev.error.code not in (C.UNKNOWN.value[0], C.INTERNAL.value[0]), ev.error
    return events


def new_session(stub, md=MD, **settings_fields) -> str:
    return stub.CreateSession(pb.CreateSessionRequest(settings=pb.SessionSettings(**settings_fields)),
                              metadata=md, timeout=30).session_id


def drop(stub, sid: str, md=MD) -> None:
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=md, timeout=30)


@pytest.fixture(scope="module")
def bystander(stub, serve_stack):
    """Another identity's session holding normal turns, one after another, while a test throws
    its cases; at the end every one of its turns must have completed intact, and every process of
    the stack must still be the one that was there before."""
    import ray
    ray_address = ray.get_runtime_context().gcs_address
    before = stack_processes(ray_address)
    sid = new_session(stub, OTHER)
    stop, results, failures = threading.Event(), [], []

    def run():
        while not stop.is_set():
            try:
                events = turn(stub, sid, OTHER, audio=pb.AudioInput(file=QUESTION.read_bytes()))
                results.append(stream_problems(events, spoken=True))
            except grpc.RpcError as e:
                failures.append(f"{e.code().name}: {e.details()}")
    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield
    stop.set()
    t.join(TIMEOUT)
    print(f"hostile cases tried: {dict(tried)}; the bystander session completed {len(results)} turns")
    assert not failures, failures
    assert results and all(p == [] for p in results), results
    after = stack_processes(ray_address)
    assert set(after.values()) == set(before.values()), (before, after)     # nobody died or restarted


@pytest.fixture(scope="module")
def sid(stub):
    s = new_session(stub)
    yield s
    drop(stub, s)


# ---------------------------------------------------------------- audio
def wav(samples: np.ndarray, rate: int, channels: int = 1, width: int = 2) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


def mutated_question(data: st.DataObject) -> bytes:
    """The bundled question with a few bytes overwritten (header included) or cut short."""
    b = bytearray(QUESTION.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        return bytes(b[:data.draw(st.integers(0, len(b)), label="cut at")])
    for _ in range(data.draw(st.integers(1, 8), label="flips")):
        b[data.draw(st.integers(0, min(len(b) - 1, 200)), label="at")] = data.draw(st.integers(0, 255))
    return bytes(b)


AUDIO = st.one_of(
    st.binary(max_size=2048).map(lambda b: pb.AudioInput(file=b)),
    st.builds(lambda b: pb.AudioInput(file=b"RIFF" + b), st.binary(max_size=512)),
    st.builds(lambda b: pb.AudioInput(file=b"fLaC" + b), st.binary(max_size=512)),
    st.builds(lambda d, r, c: pb.AudioInput(pcm16=pb.RawPcm16(data=d, sample_rate=r, channels=c)),
              st.binary(max_size=8192), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(lambda n, r, ch: pb.AudioInput(file=wav(np.zeros(n * ch, np.int16), r, ch)),
              st.integers(0, 4000), st.integers(1, 400_000), st.integers(1, 4)),
)


@given(audio=AUDIO)
@TURNS
def test_generated_audio(stub, sid, bystander, audio):
    tried["audio"] += 1
    outcome(lambda: turn(stub, sid, audio=audio), {C.INVALID_ARGUMENT})


@given(data=st.data())
@TURNS
def test_damaged_question(stub, sid, bystander, data):
    tried["damaged wav"] += 1
    audio = mutated_question(data)
    outcome(lambda: turn(stub, sid, audio=pb.AudioInput(file=audio)), {C.INVALID_ARGUMENT})
    tried["transcribe"] += 1
    outcome(lambda: stub.Transcribe(pb.TranscribeRequest(audio=pb.AudioInput(file=audio)), metadata=MD,
                                    timeout=TIMEOUT), {C.INVALID_ARGUMENT})


# ---------------------------------------------------------------- every public message field
# each field: inside its documented range (edges included) or anything at all
FLOATS = st.one_of(st.floats(0.05000000074505806, 1.0, width=32), st.floats(allow_nan=True, allow_infinity=True, width=32))
TOP_K = st.one_of(st.integers(1, 1000), st.integers(-2**31, 2**31 - 1))
SAMPLING = st.builds(
    pb.SamplingOverrides, text_temperature=FLOATS, text_top_k=TOP_K, text_top_p=FLOATS,
    audio_temperature=FLOATS, audio_top_k=TOP_K, audio_top_p=FLOATS,
    seed=st.one_of(st.sampled_from([0, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1)),
    greedy=st.booleans())
# a message's fields one at a time (others unset: their defaults), or all of them at once
ONE_FIELD = st.sampled_from([f.name for f in pb.SamplingOverrides.DESCRIPTOR.fields]).flatmap(
    lambda name: SAMPLING.map(lambda m: pb.SamplingOverrides(**{name: getattr(m, name)})))
SETTINGS = st.builds(
    pb.SessionSettings, system_prompt=st.one_of(TEXT, SPECIAL), reply_mode=st.integers(-5, 5),
    faithful_history=st.booleans(), low_latency_audio=st.booleans(), ttl_seconds=st.integers(0, 2**32 - 1),
    sampling=st.one_of(st.just(pb.SamplingOverrides()), ONE_FIELD, SAMPLING))


@given(settings_msg=SETTINGS, session_id=st.one_of(st.just(""), IDS))
@FEW
def test_generated_session_settings(stub, bystander, settings_msg, session_id):
    tried["CreateSession"] += 1
    made = []

    def create():
        made.append(stub.CreateSession(pb.CreateSessionRequest(settings=settings_msg, session_id=session_id),
                                       metadata=MD, timeout=30).session_id)
    outcome(create, {C.INVALID_ARGUMENT, C.ALREADY_EXISTS})
    for s in made:
        tried["GetSession"] += 1
        got = stub.GetSession(pb.GetSessionRequest(session_id=s), metadata=MD, timeout=30)
        assert got.session_id == s
        drop(stub, s)


@given(settings_msg=SETTINGS)
@TURNS
def test_generated_settings_then_a_turn(stub, bystander, settings_msg):
    """Settings that were accepted also run a turn (sampling limits hold in the engine too)."""
    try:
        s = stub.CreateSession(pb.CreateSessionRequest(settings=settings_msg), metadata=MD, timeout=30).session_id
    except grpc.RpcError as e:
        assert e.code() == C.INVALID_ARGUMENT, e.details()
        return
    tried["turn with generated settings"] += 1
    try:   # NOT_FOUND: a session whose ttl_seconds was a second or two has expired
        outcome(lambda: turn(stub, s, text="Hello"), {C.INVALID_ARGUMENT, C.NOT_FOUND})
    finally:
        outcome(lambda: drop(stub, s), {C.NOT_FOUND})


@given(session_id=IDS)
@FEW
def test_generated_session_ids(stub, bystander, session_id):
    tried["session id"] += 1
    ok = {C.INVALID_ARGUMENT, C.NOT_FOUND}
    outcome(lambda: stub.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=MD, timeout=30), ok)
    outcome(lambda: stub.Interrupt(pb.InterruptRequest(session_id=session_id), metadata=MD, timeout=30), ok)
    outcome(lambda: turn(stub, session_id, text="Hello"), ok)
    outcome(lambda: stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), metadata=MD, timeout=30), ok)


@given(turn_id=st.one_of(st.just(""), IDS), after=st.one_of(
    st.just(""), IDS, st.from_regex(r"[0-9]{1,25}-[0-9]{1,25}", fullmatch=True)))
@FEW
def test_generated_resume_ids(stub, sid, bystander, turn_id, after):
    tried["resume ids"] += 1
    # a resume of a turn this session never had: NOT_FOUND or INVALID_ARGUMENT; "" turn id is a new turn
    fields = {"resume_turn_id": turn_id, "after_event_id": after}
    if not turn_id:
        fields["text"] = "Hello"
    outcome(lambda: turn(stub, sid, **fields), {C.INVALID_ARGUMENT, C.NOT_FOUND})


def test_resume_of_a_real_turn_from_any_of_its_events(stub, sid, bystander):
    """The session's own finished turn, resumed after any of its events but the last (or from
    before its first): exactly the events after it, in order."""
    events = turn(stub, sid, text="Hello")
    tid, ids = events[0].turn_id, [e.event_id for e in events]
    key = lambda i: tuple(int(x) for x in i.split("-"))     # noqa: E731

    @given(after=st.one_of(st.sampled_from(ids[:-1]), st.just("0-0"), st.just("0-1")))
    @FEW
    def case(after):
        tried["resume after"] += 1
        rest = turn(stub, sid, resume_turn_id=tid, after_event_id=after)
        assert [e.event_id for e in rest] == [i for i in ids if key(i) > key(after)]
    case()


@given(text=st.one_of(TEXT, SPECIAL, st.lists(SPECIAL, max_size=6).map("".join)))
@TURNS
def test_generated_text(stub, sid, bystander, text):
    tried["text turn"] += 1
    code = outcome(lambda: turn(stub, sid, text=text), {C.INVALID_ARGUMENT})
    tried["synthesize"] += 1
    outcome(lambda: list(stub.Synthesize(pb.SynthesizeRequest(text=text), metadata=MD, timeout=TIMEOUT)),
            {C.INVALID_ARGUMENT})
    if not text.strip():
        assert code == C.INVALID_ARGUMENT


# ---------------------------------------------------------------- oversized and stalled callers
def test_oversized_messages(stub, serve_stack, bystander):
    """A message over limits.max_message_bytes, as file, raw PCM or text: RESOURCE_EXHAUSTED."""
    from services.common.settings import Settings
    cap = Settings.load(str(serve_stack.settings_path)).limits.max_message_bytes
    channel = grpc.insecure_channel(serve_stack.address, options=[("grpc.max_send_message_length", 2 * cap)])
    big = pb_grpc.ConversationServiceStub(channel)
    s = new_session(stub)
    try:
        for req in (pb.ConverseRequest(session_id=s, audio=pb.AudioInput(file=b"\0" * (cap + 1))),
                    pb.ConverseRequest(session_id=s, audio=pb.AudioInput(pcm16=pb.RawPcm16(
                        data=b"\0" * (cap + 2), sample_rate=16000, channels=1))),
                    pb.ConverseRequest(session_id=s, text="a" * (cap + 1))):
            tried["oversized"] += 1
            assert outcome(lambda: list(big.Converse(req, metadata=MD, timeout=TIMEOUT)),
                           {C.RESOURCE_EXHAUSTED}) == C.RESOURCE_EXHAUSTED
    finally:
        channel.close()
        drop(stub, s)


def test_stalled_and_vanishing_callers(stub, serve_stack, bystander):
    """Callers that open a turn and never read it, or cancel at once: the turns still finish into
    their streams (a later resume gets every event once), and the stack serves everyone else."""
    channels = [grpc.insecure_channel(serve_stack.address) for _ in range(4)]
    sids = [new_session(stub) for _ in channels]
    try:
        calls = []
        for ch, s in zip(channels, sids):
            call = pb_grpc.ConversationServiceStub(ch).Converse(
                pb.ConverseRequest(session_id=s, audio=pb.AudioInput(file=QUESTION.read_bytes())),
                metadata=MD, timeout=TIMEOUT)
            calls.append(call)
        first = [next(c) for c in calls[:2]]           # two read one event, then stall
        calls[2].cancel()                               # one leaves at once, one never reads at all
        tried["stalled or vanished"] += 4
        other = new_session(stub, OTHER)                # meanwhile another session's turn completes
        assert stream_problems(turn(stub, other, OTHER, text="Hello"), spoken=True) == []
        drop(stub, other, OTHER)
        for ev, s in zip(first, sids[:2]):              # the stalled ones resume: all of it, once
            rest = turn(stub, s, resume_turn_id=ev.turn_id, after_event_id=ev.event_id)
            assert stream_problems([ev] + rest, spoken=True) == []
        for c in calls[3:]:                             # the silent one still gets its whole turn
            assert stream_problems(list(c), spoken=True) == []
    finally:
        for ch in channels:
            ch.close()
        for s in sids:
            try:
                drop(stub, s)
            except grpc.RpcError:
                pass
