"""Resource bounds of the served stack (real Ray Serve apps, redis-server, gRPC, tiny checkpoint):
history limits at the model's context, callers that leave, and what Redis holds."""
from __future__ import annotations

import random
import time

import grpc
import numpy as np
import pytest

from baichuan_audio.v1 import conversation_pb2 as pb
from services.common.entries import DECODER_JOBS, VOCODER_JOBS, lanes
from tests.orchestrator.redis_monitor import Monitor
from tests.orchestrator.test_service import QUESTION, META, TIMEOUT, check_turn, converse, session, stub  # noqa: F401

WORDS = ("hello", "world", "session", "turn", "again", "long", "story", "about", "the", "model")


def long_text(chars: int, seed: int) -> str:
    rng = random.Random(seed)
    out = ""
    while len(out) < chars:
        out += rng.choice(WORDS) + " "
    return out[:chars]


@pytest.fixture(scope="module")
def settings(serve_stack):
    from services.common.settings import Settings
    return Settings.load(str(serve_stack.settings_path))


def test_a_long_session_keeps_working_at_the_context_limit(stub, settings, serve_stack):
    """Typed turns near limits.max_text_chars (~2,000 tokens each on the tiny tokenizer) fill the
    tiny model's 4,096-token context within three turns: the oldest turns are dropped and every
    turn still completes (without the rule, the third turn's prompt is refused)."""
    from services.common.checkpoint import Checkpoint
    from services.common.text_tokenizer import load_text_tokenizer

    ckpt = Checkpoint(serve_stack.checkpoint)
    context = settings.llm.context_tokens(ckpt.config.llm.max_position_embeddings)
    tok = load_text_tokenizer(ckpt.path)
    texts = [long_text(settings.limits.max_text_chars - 100, k) for k in range(4)]
    assert sum(len(tok.encode(t, add_special_tokens=False)) for t in texts[:3]) > context
    sid = session(stub, reply_mode=pb.REPLY_MODE_TEXT)
    for text in texts:
        end, _ = check_turn(converse(stub, sid, text=text), spoken=False)
        assert end.reason in ("complete", "length")
    s = stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=META, timeout=30)
    assert s.turns == 4 and [h.text for h in s.history[::2]] == texts


def test_system_prompt_over_the_limit_is_invalid_argument(stub, settings):
    n = settings.limits.max_system_prompt_chars
    with pytest.raises(grpc.RpcError) as e:
        session(stub, system_prompt="s" * (n + 1))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limits.max_system_prompt_chars" in e.value.details()
    check_turn(converse(stub, session(stub, system_prompt="s" * n), text="Hello"))


# ---------------------------------------------------------------- what Redis holds

def wait_for(check, timeout_s: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_caller_that_leaves_mid_turn_can_resume_the_finished_turn_then_it_is_freed(stub, serve_stack, settings):
    """The turn runs on into its events stream without its caller; once it has ended, the
    caller resumes it within bus.finished_turn_ttl_s, and everything else of it is gone: the
    stage streams deleted, the LLM request ended on its own, every key left expiring."""
    import redis

    from tests.orchestrator.test_stage_services import llm_status

    r = redis.Redis.from_url(serve_stack.redis_url)
    sid = session(stub)
    req = pb.ConverseRequest(session_id=sid)
    req.audio.file = QUESTION.read_bytes()
    call = stub.Converse(req, metadata=META, timeout=TIMEOUT)
    first = [next(call), next(call)]
    call.cancel()
    turn = first[-1].turn_id
    wait_for(lambda: stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=META, timeout=30).turns == 1,
             what="the turn to be recorded without its caller")
    rest = list(stub.Converse(pb.ConverseRequest(session_id=sid, resume_turn_id=turn,
                                                 after_event_id=first[-1].event_id), metadata=META, timeout=TIMEOUT))
    end, _ = check_turn(first + rest)
    assert end.reason == "complete"
    assert llm_status(turn) == "eos"
    assert not r.exists(f"turn:{turn}:llm", f"turn:{turn}:audio")
    assert 0 < r.ttl(f"turn:{turn}:events") <= settings.bus.finished_turn_ttl_s
    left = [k for k in r.scan_iter(f"*{turn}*")]
    assert left and all(0 < r.ttl(k) <= settings.limits.session_ttl_s for k in left), \
        {k: r.ttl(k) for k in left}


# keys the stack writes that are not per session or turn: bounded in length, not in time
FIXED_KEYS = {*lanes(DECODER_JOBS), *lanes(VOCODER_JOBS)}
WRITES = {"set", "hset", "hsetnx", "xadd", "zadd", "sadd", "lpush", "rpush", "incr", "incrby", "setex",
          "hincrby", "append", "xgroup", "expire", "pexpire", "del", "xack", "xdel", "xtrim", "persist"}


def test_every_key_a_turn_writes_expires_and_every_stream_is_capped(stub, serve_stack, settings):
    """MONITOR over a session's creation and a whole spoken turn in low-latency mode: every XADD
    carries a MAXLEN (the work streams are capped by the backlog check instead), and every key
    written still there afterwards has a TTL, except the fixed-name work streams."""
    import redis

    r = redis.Redis.from_url(serve_stack.redis_url)
    mon = Monitor(serve_stack.redis_url)
    try:
        sid = session(stub, low_latency_audio=True)
        events = converse(stub, sid)
        check_turn(events)
        time.sleep(1.0)                                # late writes of the stages, if any
    finally:
        commands = mon.close()
    writes = [c for c in commands if c[0] in WRITES and len(c) > 1]
    written = {c[1] for c in writes if c[0] not in ("del", "expire", "pexpire", "persist")}
    turn = events[-1].turn_id
    assert {f"session:alice:{sid}", f"turn:{turn}:events", f"turn:{turn}:llm", f"turn:{turn}:audio"} <= written
    assert any(k.startswith(f"result:decoder:{turn}:") for k in written)
    for c in writes:
        if c[0] == "xadd" and c[1] not in FIXED_KEYS:
            assert "MAXLEN" in (a.upper() for a in c), f"uncapped stream write: {' '.join(c[:6])}"
    no_ttl = {k: r.type(k).decode() for k in written if r.exists(k) and r.ttl(k) < 0}
    assert set(no_ttl) <= FIXED_KEYS, f"keys written during a turn without a TTL: {no_ttl}"
    assert all(r.type(k) == b"stream" for k in no_ttl)


class RedisFullWhile:
    """redis-server at its memory limit (maxmemory 1 byte, policy noeviction: every write is
    refused) until closed; the original limit is restored even if the test fails."""

    def __init__(self, url: str):
        import redis

        self.r = redis.Redis.from_url(url)
        self.saved = self.r.config_get("maxmemory")["maxmemory"]
        assert self.r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"

    def __enter__(self):
        self.r.config_set("maxmemory", 1)
        return self

    def __exit__(self, *exc):
        self.r.config_set("maxmemory", self.saved)


def test_a_full_redis_is_resource_exhausted_not_a_stuck_turn(stub, serve_stack):
    """Redis at maxmemory refuses writes: new sessions and turns get RESOURCE_EXHAUSTED at once;
    a turn that is running when Redis fills up ends for its caller within seconds with
    RESOURCE_EXHAUSTED instead of waiting for events nobody can write; once Redis takes writes
    again, the same session takes its next turn."""
    sid = session(stub)
    with RedisFullWhile(serve_stack.redis_url):
        for call in (lambda: session(stub), lambda: converse(stub, sid, text="Hello")):
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "memory limit" in e.value.details()
            assert time.monotonic() - t0 < 10
    check_turn(converse(stub, sid, text="Hello"))

    req = pb.ConverseRequest(session_id=sid)
    req.audio.file = QUESTION.read_bytes()
    call = stub.Converse(req, metadata=META, timeout=TIMEOUT)
    got = [next(call)]
    with RedisFullWhile(serve_stack.redis_url):
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            got += list(call)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.value.code(), got[-1])
        assert "memory limit" in e.value.details() and time.monotonic() - t0 < 15
    # the turn's end reaches its stream once Redis takes writes: the session is not blocked
    wait_for(lambda: _turn_ended(serve_stack.redis_url, got[0].turn_id), 30, "the refused turn's end")
    check_turn(converse(stub, sid, text="Hello"))


def _turn_ended(url: str, turn_id: str) -> bool:
    import redis

    from services.common.bus import Bus
    from orchestrator import turns

    return turns.is_over(Bus(redis.Redis.from_url(url, protocol=2)), turn_id)


def test_the_documented_redis_budget_of_a_turn_holds(stub, serve_stack, settings):
    """README "Redis memory": a finished turn keeps its events (the reply's PCM once more: about
    48 KB per second of audio, plus overhead), the session hash its settings, history and the
    model's tokens (4 bytes each) and codes (32 bytes per audio frame). The events' PCM is 48 KB
    a second; Redis stores each entry in its own allocation (rounded up to the allocator's size
    class) with its field names, so the README gives ~60 KB (measured: 118 KB for 1.94 s)."""
    import redis

    r = redis.Redis.from_url(serve_stack.redis_url)
    sid = session(stub)
    events = converse(stub, sid)
    end, _ = check_turn(events)
    used = r.memory_usage(f"turn:{events[-1].turn_id}:events", samples=0)
    assert used <= 62_000 * end.audio_seconds + 20_000, (used, end.audio_seconds)
    h = r.hgetall(f"session:alice:{sid}")
    tokens, rows = len(h[b"tokens"]) // 4, len(h[b"codes"]) // 32
    assert rows == sum(1 for t in np.frombuffer(h[b"tokens"], "<i4") if t == audio_pad(serve_stack))
    budget = 4 * tokens + 32 * rows + len(h[b"history"]) + len(h[b"settings"]) + 2048   # + its small fields
    assert r.memory_usage(f"session:alice:{sid}", samples=0) <= budget


def audio_pad(serve_stack) -> int:
    from services.common.model_config import ModelConfig
    return ModelConfig.from_file(serve_stack.checkpoint).audio_tokens.audio_pad
