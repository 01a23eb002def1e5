"""The public API as a hostile caller meets it, through Serve's real gRPC proxy: no key, no
entry; another identity's sessions and turns do not exist; ids are checked; the stage services
take internal keys only; per-identity limits answer RESOURCE_EXHAUSTED with the wait; keys
never reach a log, a trace, an error or a session; text cannot inject special tokens."""
from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from google.rpc import error_details_pb2, status_pb2

from baichuan_audio.v1 import conversation_pb2 as pb
from baichuan_audio.v1 import stages_pb2, stages_pb2_grpc
from orchestrator.client import retry_after
from services.common.entries import ClientEvent
from tests.conftest import INTERNAL_KEY, TEST_KEYS, metadata
from tests.orchestrator.test_service import QUESTION, TIMEOUT, check_turn, stub  # noqa: F401 (fixture)

ALICE, BOB = metadata("alice"), metadata("bob")


@pytest.fixture(scope="module")
def r(serve_stack):
    client = redis.Redis.from_url(serve_stack.redis_url)
    yield client
    client.close()


def create(stub, md=ALICE, **kw) -> str:
    return stub.CreateSession(pb.CreateSessionRequest(**kw), metadata=md, timeout=30).session_id


def converse(stub, sid: str, md=ALICE, text: str | None = "Hello", **kw) -> list[pb.TurnEvent]:
    req = pb.ConverseRequest(session_id=sid, **kw)
    if "resume_turn_id" not in kw:
        if text is None:
            req.audio.file = QUESTION.read_bytes()
        else:
            req.text = text
    return list(stub.Converse(req, metadata=md, timeout=TIMEOUT))


def status_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


# every public method, called with the given metadata
CALLS = {
    "CreateSession": lambda s, md: s.CreateSession(pb.CreateSessionRequest(), metadata=md, timeout=30),
    "GetSession": lambda s, md: s.GetSession(pb.GetSessionRequest(session_id="x"), metadata=md, timeout=30),
    "DeleteSession": lambda s, md: s.DeleteSession(pb.DeleteSessionRequest(session_id="x"), metadata=md, timeout=30),
    "Converse": lambda s, md: list(s.Converse(pb.ConverseRequest(session_id="x", text="hi"), metadata=md, timeout=30)),
    "Interrupt": lambda s, md: s.Interrupt(pb.InterruptRequest(session_id="x"), metadata=md, timeout=30),
    "Transcribe": lambda s, md: s.Transcribe(pb.TranscribeRequest(audio=pb.AudioInput(file=QUESTION.read_bytes())),
                                             metadata=md, timeout=30),
    "Synthesize": lambda s, md: list(s.Synthesize(pb.SynthesizeRequest(text="hi"), metadata=md, timeout=30)),
}
WRONG_KEY = "wrong-key-that-nobody-issued-0123456789"


# ---------------------------------------------------------------- authentication

@pytest.mark.parametrize("method", sorted(CALLS))
@pytest.mark.parametrize("md", [metadata(None), (("application", "conversation"), ("authorization", f"Bearer {WRONG_KEY}")),
                                (("application", "conversation"), ("authorization", TEST_KEYS["alice"]))],
                         ids=["no-key", "wrong-key", "no-bearer"])
def test_every_method_needs_a_valid_key(stub, method, md):
    e = status_of(lambda: CALLS[method](stub, md))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <API key>" in e.details()
    assert WRONG_KEY not in e.details() and TEST_KEYS["alice"] not in e.details()


def test_health_and_reflection_stay_open(serve_stack, stub):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    channel = grpc.insecure_channel(serve_stack.address)
    r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), metadata=metadata(None),
                                                 timeout=30)
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    assert "baichuan_audio.v1.ConversationService" in ProtoReflectionDescriptorDatabase(channel).get_services()
    channel.close()


def test_stage_services_take_only_the_internal_key(serve_stack, stub):
    channel = grpc.insecure_channel(serve_stack.address)
    decoder = stages_pb2_grpc.DecoderStub(channel)
    req = stages_pb2.DecodeRequest(codes=stages_pb2.Codes(frames=1, codebooks=8, values=[1] * 8))
    for md in (metadata(None, "decoder"), metadata("alice", "decoder")):   # a public key is not enough
        e = status_of(lambda: decoder.Decode(req, metadata=md, timeout=60))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "internal key" in e.details()
        assert TEST_KEYS["alice"] not in e.details()
    llm = stages_pb2_grpc.LLMStub(channel)
    e = status_of(lambda: list(llm.Generate(stages_pb2.GenerateRequest(prompt_ids=[1, 2]),
                                            metadata=metadata("bob", "llm"), timeout=60)))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    assert decoder.Decode(req, metadata=metadata("internal", "decoder"), timeout=60).mel.cols > 0
    channel.close()


# ---------------------------------------------------------------- ownership and ids

def test_another_identitys_session_does_not_exist_for_it(stub, r):
    sid = create(stub)
    first = converse(stub, sid)
    turn = first[-1].turn_id
    not_found = [
        lambda: stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=BOB, timeout=30),
        lambda: converse(stub, sid, BOB),
        lambda: converse(stub, sid, BOB, resume_turn_id=turn, after_event_id=first[0].event_id),
        lambda: stub.Interrupt(pb.InterruptRequest(session_id=sid), metadata=BOB, timeout=30),
        lambda: stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=BOB, timeout=30),
    ]
    unknown = status_of(lambda: stub.GetSession(pb.GetSessionRequest(session_id="0" * 32), metadata=BOB, timeout=30))
    for call in not_found:
        e = status_of(call)
        assert e.code() == grpc.StatusCode.NOT_FOUND
        # word for word what an unknown id gets: nothing tells bob the session exists
        assert e.details().replace(sid, "0" * 32) == unknown.details()
    s = stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=ALICE, timeout=30)
    assert s.turns == 1                       # bob's attempts changed nothing
    rest = converse(stub, sid, ALICE, resume_turn_id=turn, after_event_id=first[0].event_id)
    assert [e.event_id for e in rest] == [e.event_id for e in first[1:]]


def test_resume_names_a_turn_of_the_session(stub):
    a, b = create(stub), create(stub)
    events = converse(stub, a)
    turn = events[-1].turn_id
    e = status_of(lambda: converse(stub, b, resume_turn_id=turn))   # alice's, but of session a
    assert e.code() == grpc.StatusCode.NOT_FOUND and "of another session" in e.details()
    for bad_turn, bad_after in ((f"{turn}:events", ""), ("x" * 32, ""), (turn, "not-an-id"), (turn, "1-2-3")):
        e = status_of(lambda: converse(stub, a, resume_turn_id=bad_turn, after_event_id=bad_after))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (bad_turn, bad_after, e.details())


def test_caller_chosen_ids_are_namespaced_by_identity(stub):
    create(stub, ALICE, session_id="chat-1", settings=pb.SessionSettings(system_prompt="alice's voice"))
    e = status_of(lambda: create(stub, ALICE, session_id="chat-1"))
    assert e.code() == grpc.StatusCode.ALREADY_EXISTS
    create(stub, BOB, session_id="chat-1", settings=pb.SessionSettings(system_prompt="bob's voice"))
    get = lambda md: stub.GetSession(pb.GetSessionRequest(session_id="chat-1"), metadata=md, timeout=30)  # noqa: E731
    assert get(ALICE).settings.system_prompt == "alice's voice" and get(BOB).settings.system_prompt == "bob's voice"
    check_turn(converse(stub, "chat-1", BOB, text=None))          # bob's turn runs in bob's session ...
    assert get(ALICE).turns == 0 and get(BOB).turns == 1          # ... and alice's did not move


@pytest.mark.parametrize("bad", ["X:faithful", "", "a b", "x" * 65, "../../etc"])
def test_session_ids_are_validated_on_every_call(stub, bad):
    for call in (lambda: stub.GetSession(pb.GetSessionRequest(session_id=bad), metadata=ALICE, timeout=30),
                 lambda: stub.DeleteSession(pb.DeleteSessionRequest(session_id=bad), metadata=ALICE, timeout=30),
                 lambda: stub.Interrupt(pb.InterruptRequest(session_id=bad), metadata=ALICE, timeout=30),
                 lambda: converse(stub, bad)):
        e = status_of(call)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in e.details()
    if bad:
        assert status_of(lambda: create(stub, session_id=bad)).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_delete_session(stub, r):
    sid = create(stub, settings=pb.SessionSettings(faithful_history=True))
    check_turn(converse(stub, sid, text=None))
    assert r.exists(f"session:alice:{sid}:faithful")
    assert stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=ALICE, timeout=30).deleted
    assert not r.keys(f"session:alice:{sid}*")
    for call in (lambda: stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=ALICE, timeout=30),
                 lambda: converse(stub, sid),
                 lambda: stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=ALICE, timeout=30)):
        assert status_of(call).code() == grpc.StatusCode.NOT_FOUND


def test_a_session_expires_after_its_ttl(stub):
    sid = create(stub, settings=pb.SessionSettings(ttl_seconds=1))
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=ALICE, timeout=30).expires_unix_ms
    time.sleep(1.5)
    e = status_of(lambda: stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=ALICE, timeout=30))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "expired" in e.details()


# ---------------------------------------------------------------- per-identity limits

def assert_retry_metadata(e: grpc.RpcError, low: float, high: float) -> None:
    """RESOURCE_EXHAUSTED whose trailing metadata says when to retry, both ways."""
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    md = dict(e.trailing_metadata())
    assert low <= float(md["retry-after"]) <= high + 1
    status = status_pb2.Status.FromString(md["grpc-status-details-bin"])
    info = error_details_pb2.RetryInfo()
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and status.details[0].Unpack(info)
    assert low <= info.retry_delay.ToNanoseconds() / 1e9 <= high
    assert low <= retry_after(e) <= high + 1


def test_live_sessions_per_identity(stub):
    md = metadata("two-sessions")
    first, _ = create(stub, md), create(stub, md)
    e = status_of(lambda: create(stub, md))
    assert "two-sessions has 2 live sessions, its limit (quotas.sessions)" in e.details()
    assert_retry_metadata(e, 1700, 1800)                  # until the oldest expires (limits.session_ttl_s)
    create(stub, ALICE)                                    # other identities are not affected
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=first), metadata=md, timeout=30)
    create(stub, md)


def test_requests_per_minute(stub):
    md = metadata("five-rpm")
    sid = create(stub, md)
    for _ in range(4):
        stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=md, timeout=30)
    e = status_of(lambda: stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=md, timeout=30))
    assert "five-rpm is over its limit of 5 requests per minute" in e.details()
    assert_retry_metadata(e, 10.0, 12.0)                  # one request refills every 12 s
    # a streaming call cannot carry trailing metadata through Serve: the wait is in the message
    e = status_of(lambda: converse(stub, sid, md))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and 9.0 < retry_after(e) <= 12.0


def test_running_turns_per_identity(stub, r):
    md = metadata("one-turn")
    a, b = create(stub, md), create(stub, md)
    # a turn of this identity that is running (its producer holds its lease, its stream is not ended)
    running = "ab" * 16
    r.set(f"turn:{running}:lease:producer", b"1", ex=60)
    r.xadd(f"turn:{running}:events", ClientEvent(turn_id=running, payload=b"").encode())
    r.zadd("quota:one-turn:turns", {running: int(time.time() * 1000)})
    e = status_of(lambda: converse(stub, b, md))
    assert "one-turn already runs 1 turns at once (quotas.turns)" in e.details() and retry_after(e) == 1.0
    e = status_of(lambda: stub.Synthesize(pb.SynthesizeRequest(text="hi"), metadata=md, timeout=30).next())
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # it ends: the next turn runs, and when that one ends, the one after runs too
    r.xadd(f"turn:{running}:events", ClientEvent(turn_id=running, payload=b"", last=True).encode())
    check_turn(converse(stub, a, md, text=None))
    check_turn(converse(stub, b, md, text=None))


def test_audio_seconds_per_hour(stub, r):
    md = metadata("little-audio")                          # 2 s per hour; the question is 3.8 s
    sid = create(stub, md)
    e = status_of(lambda: converse(stub, sid, md, text=None))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "longer than the hourly budget" in e.details()
    assert retry_after(e) is None                          # it never fits: no wait is offered
    # a text turn takes no audio in; its spoken reply is charged when it ends
    end, _ = check_turn(converse(stub, sid, md, text="Hello"))
    assert end.audio_seconds > 0
    now_ms = float(r.time()[0]) * 1000
    spent_ms = float(r.get("quota:little-audio:audio")) - now_ms           # GCRA: T = 1800 s per audio second
    assert spent_ms == pytest.approx(end.audio_seconds * 1800 * 1000, abs=30_000)
    # spent beyond the budget (as a long reply leaves it): the next turn waits, and says how long
    r.set("quota:little-audio:audio", str(now_ms + 3600 * 1000 + 20_000))
    e = status_of(lambda: stub.Transcribe(pb.TranscribeRequest(audio=pb.AudioInput(file=QUESTION.read_bytes())),
                                          metadata=md, timeout=TIMEOUT))
    assert "used its 2 audio seconds of the last hour" in e.details()
    assert_retry_metadata(e, 15.0, 20.0)
    e = status_of(lambda: converse(stub, sid, md, text="Hello"))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and 15.0 <= retry_after(e) <= 20.0


# ---------------------------------------------------------------- secrets

def test_keys_appear_in_no_log_trace_error_or_session(serve_stack, stub):
    import ray

    wrong = "sk-secret-never-logged-0123456789"
    sid = create(stub)
    for md in (ALICE, (("application", "conversation"), ("authorization", f"Bearer {wrong}"))):
        for call in (lambda: stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=md, timeout=30),
                     lambda: converse(stub, sid, md),
                     lambda: converse(stub, "no-such", md),
                     lambda: stub.DeleteSession(pb.DeleteSessionRequest(session_id="X:y"), metadata=md, timeout=30)):
            try:
                out = call()
            except grpc.RpcError as e:
                assert wrong not in (e.details() or "") and TEST_KEYS["alice"] not in (e.details() or "")
                continue
            blob = b"".join(m.SerializeToString() for m in (out if isinstance(out, list) else [out]))
            assert TEST_KEYS["alice"].encode() not in blob
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    deadline = time.monotonic() + 30                   # the replicas' span batches go out every 0.5 s
    while True:
        files = [p for p in logs.rglob("*") if p.is_file()]
        if any(b'"identity": "alice"' in p.read_bytes() for p in files) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert any(b'"identity": "alice"' in p.read_bytes() for p in files), "no turn span in the logs: the check is blind"
    secrets = [k.encode() for k in (*TEST_KEYS.values(), INTERNAL_KEY, wrong)]
    leaked = {p.name: s.decode() for p in files for s in secrets if s in p.read_bytes()}
    assert not leaked, f"keys in the Ray logs: {leaked}"


# ---------------------------------------------------------------- special tokens

def test_text_cannot_inject_special_tokens(stub, r, serve_stack):
    """A user turn and a system prompt made of the model's special strings (from the served
    checkpoint's tokenizer config) reach the model as plain text."""
    from services.common.checkpoint import Checkpoint
    from services.common.text_tokenizer import load_text_tokenizer
    from services.llm.prompts import Message, PromptBuilder, ProtocolTokens

    ckpt = Path(serve_stack.checkpoint)
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))
    specials = {t["content"]: int(i) for i, t in cfg["added_tokens_decoder"].items() if t.get("special")}
    injected = "".join(specials)

    tok = load_text_tokenizer(ckpt)
    c = Checkpoint(ckpt)
    builder = PromptBuilder(tok, ProtocolTokens.from_tokenizer(tok, c.config, c.generation_config()),
                            c.config.audio.num_codebooks)
    t = builder.tokens
    sid = create(stub, settings=pb.SessionSettings(reply_mode=pb.REPLY_MODE_TEXT, system_prompt=injected))
    check_turn(converse(stub, sid, text=injected), spoken=False)
    tokens = np.frombuffer(r.hget(f"session:alice:{sid}", "tokens"), dtype="<i4").tolist()
    # the model saw exactly this prompt, whose only special ids are the builder's three roles
    prompt = builder.chat([Message("system", injected), Message("user", injected)], spoken=False).ids
    assert tokens[:len(prompt)] == prompt
    assert [i for i in prompt if i in specials.values()] == [t.system, t.user, t.assistant]
