"""The producer's side of an LLM replica's death (orchestrator/turns.py) on a real redis-server:
a turn whose LLM lease lapsed without its end is continued by another replica (continue_llm),
asked again while none takes it, at most `max_continuations` times; then, or when the
continuation cannot be built, the turn ends with UNAVAILABLE. The whole path with a killed
replica is tests/orchestrator/test_faults.py."""
from __future__ import annotations

import uuid

import grpc
import pytest

from orchestrator import turns
from orchestrator.merge import ReplyMerger
from services.common import entries
from services.common.bus import Bus

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


@pytest.fixture
def bus(redis_url):
    b = Bus(redis_url, turn_ttl_s=60, lease_ttl_s=1.0)
    yield b
    b.redis.close()


def produce(bus, tid, continue_llm, n, began=True):
    """The producer of a turn whose LLM replica (if `began`) held its lease and died at once."""
    if began:
        bus.redis.set(bus.lease_key(tid, turns.LLM), b"x", px=200)
    return turns.produce(bus, ReplyMerger(tid, spoken=False), tid, interrupted=lambda: False,
                         continue_llm=continue_llm, max_continuations=n)


def test_a_continuation_that_dies_too_is_continued_up_to_the_limit(bus):
    tid = uuid.uuid4().hex
    calls = []

    def continue_llm(n):          # the continuing replica takes the lease and dies at once
        calls.append(n)
        bus.redis.set(bus.lease_key(tid, turns.LLM), b"x", px=200)

    out = produce(bus, tid, continue_llm, 2)
    assert calls == [1, 2]
    assert out.error.code == UNAVAILABLE and "continued 2 times, the limit" in out.error.message
    assert "send the turn again" in out.error.message


def test_a_continuation_is_asked_again_while_no_replica_takes_it_and_completes_the_turn(bus, monkeypatch):
    monkeypatch.setattr(turns, "CONTINUE_RETRY_S", 0.05)
    tid = uuid.uuid4().hex
    calls = []

    def continue_llm(n):
        calls.append(n)
        if len(calls) == 1:
            raise RuntimeError("the replica is restarting")
        bus.publish(tid, "llm", entries.TextDelta(turn_id=tid, segment=0, text="hi",
                                                  tokens=entries.Array.of([7], entries.INT32)))
        bus.publish(tid, "llm", entries.TurnEnd.with_tokens(tid, "eos", [1, 7], None, text="hi"))

    out = produce(bus, tid, continue_llm, 2)
    assert calls == [1, 1]
    assert out.error is None and out.end.reason == "complete" and out.text == "hi"
    assert out.history == [1, 7]


def test_a_turn_no_llm_replica_began_is_not_continued(bus):
    """Its conversation replica died before asking for it (a resume took it over): nothing to
    continue, and the caller hears UNAVAILABLE as before."""
    tid = uuid.uuid4().hex
    calls = []
    out = produce(bus, tid, calls.append, 2, began=False)
    assert calls == []
    assert out.error.code == UNAVAILABLE and "no LLM replica had begun it" in out.error.message


@pytest.mark.parametrize("limit", [0, 1])
def test_a_turn_that_cannot_be_continued_ends_with_unavailable(bus, limit):
    tid = uuid.uuid4().hex
    calls = []

    def continue_llm(n):
        calls.append(n)
        raise ValueError("the reply record does not fit the protocol")

    out = produce(bus, tid, continue_llm, limit)
    assert calls == [1] * limit
    assert out.error.code == UNAVAILABLE
    assert ("does not fit the protocol" if limit else "continuing is off") in out.error.message
