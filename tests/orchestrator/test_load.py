"""Load on the served stack (the session's test stack: real Serve apps, redis-server, gRPC):
the load generator's small version, and admission control. Zero errors and zero lost or
duplicated chunks are asserted; timings are printed, never asserted (a loaded 2-core machine)."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import redis

from baichuan_audio.v1 import conversation_pb2 as pb
from orchestrator.client import retry_after
from orchestrator.load import check_turn as load_check, run_load
from orchestrator.quotas import RUNNING_KEY
from services.common.entries import ClientEvent
from services.common.settings import Settings
from tests.conftest import TEST_KEYS, metadata
from tests.orchestrator.test_service import QUESTION, TIMEOUT, check_turn, stub  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def capacity(serve_stack) -> int:
    return Settings.load(str(serve_stack.settings_path)).limits.max_running_turns


@pytest.fixture
def r(serve_stack):
    client = redis.Redis.from_url(serve_stack.redis_url, protocol=2)
    yield client
    client.close()


class Occupied:
    """Places of the stack's running turns taken by turns that look running (their caller
    stream is live and not ended, and their producer holds its lease, as a turn whose stages
    are still working), given back at exit."""

    def __init__(self, r, n: int):
        self.r, self.ids = r, [f"{i:032x}" for i in range(1, n + 1)]

    def __enter__(self):
        now = int(time.time() * 1000)
        for t in self.ids:
            self.r.xadd(f"turn:{t}:events", ClientEvent(turn_id=t, payload=b"").encode())
            self.r.zadd(RUNNING_KEY, {t: now})
            self.r.set(f"turn:{t}:lease:producer", b"1", ex=600)
        return self

    def end(self, t: str) -> None:
        self.r.xadd(f"turn:{t}:events", ClientEvent(turn_id=t, payload=b"", last=True).encode())

    def __exit__(self, *exc):
        self.r.zrem(RUNNING_KEY, *self.ids)
        self.r.delete(*(f"turn:{t}:events" for t in self.ids), *(f"turn:{t}:lease:producer" for t in self.ids))


def test_load_generator_small(serve_stack, stub, capacity, r):
    """6 sessions x 2 turns while all but 2 of the stack's places are taken: the sessions beyond
    them are refused at once (RESOURCE_EXHAUSTED, retried after the server's wait) and every
    admitted turn completes, with every audio chunk exactly once."""
    with Occupied(r, capacity - 2):
        report = asyncio.run(run_load(serve_stack.address, sessions=6, turns=2, api_key=TEST_KEYS["bob"],
                                      audio=QUESTION.read_bytes(), deadline_s=300, out=None))
    print(report.summary())
    assert report.error_count == 0, report.summary()
    assert report.problems == [], report.summary()
    assert report.sessions == 6 and report.turns == 12
    assert report.chunks > 0 and len(report.first_audio_s) == 12
    assert report.refused["Converse"] > 0          # 6 sessions, 2 places: some waited their turn


def test_over_capacity_refused_at_once_admitted_complete(stub, capacity, r):
    """At capacity a new turn of any identity is refused at once with a retry delay and is counted
    nowhere; a turn admitted in a freed place completes while the others still run."""
    sids = {who: stub.CreateSession(pb.CreateSessionRequest(), metadata=metadata(who), timeout=30).session_id
            for who in ("alice", "bob")}
    with Occupied(r, capacity) as full:
        for who, sid in sids.items():
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Converse(pb.ConverseRequest(session_id=sid, text="Hello"), metadata=metadata(who),
                                   timeout=TIMEOUT))
            print(f"{who} refused in {time.monotonic() - t0:.3f} s")
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "the service is at capacity" in e.value.details() and "limits.max_running_turns" in e.value.details()
            assert retry_after(e.value) == 1.0
        with pytest.raises(grpc.RpcError) as e:
            stub.Synthesize(pb.SynthesizeRequest(text="hi"), metadata=metadata("alice"), timeout=30).next()
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert r.zcard("quota:alice:turns") == 0 and r.zcard(RUNNING_KEY) == capacity
        full.end(full.ids[0])                         # one place frees; capacity - 1 still run
        events = list(stub.Converse(pb.ConverseRequest(session_id=sids["bob"], audio=pb.AudioInput(
            file=QUESTION.read_bytes())), metadata=metadata("bob"), timeout=TIMEOUT))
        check_turn(events)
        assert load_check(events, spoken=True) == []
        assert r.zcard(RUNNING_KEY) == capacity - 1   # it ended and gave its place back
