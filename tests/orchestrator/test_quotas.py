"""Per-identity quotas on a real redis-server: what several orchestrator replicas share, the
limit held under concurrency, and the wait each refusal names."""
from __future__ import annotations

import threading
import time

import pytest
import redis

from orchestrator.quotas import Quotas
from services.common.errors import QuotaExceeded, ResourceExhausted
from services.common.settings import QuotasSettings


@pytest.fixture
def r(private_redis):
    return private_redis


def quotas(r, **limits) -> Quotas:
    return Quotas(r, QuotasSettings(**limits), turn_ttl_s=60)


def test_requests_per_minute_burst_then_refill(r):
    q = quotas(r, requests_per_minute=6)
    for _ in range(6):
        q.request("alice")
    with pytest.raises(QuotaExceeded) as e:
        q.request("alice")
    assert "alice is over its limit of 6 requests per minute (quotas.requests_per_minute)" in str(e.value)
    assert 9.0 < e.value.retry_after_s <= 10.0          # one request refills every 10 s
    assert f"retry after {e.value.retry_after_s:.1f} s" in str(e.value)
    q.request("bob")                                     # per identity


def test_replicas_share_the_count_and_never_exceed_it(r):
    """Four replicas' clients, 40 requests at once: exactly the limit is admitted."""
    qs = [quotas(redis.Redis(connection_pool=r.connection_pool), requests_per_minute=25) for _ in range(4)]
    admitted = []

    def call(q):
        try:
            q.request("alice")
            admitted.append(1)
        except QuotaExceeded:
            pass

    threads = [threading.Thread(target=call, args=(qs[i % 4],)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 25


def test_overrides_per_identity(r):
    q = quotas(r, requests_per_minute=100, overrides={"batch": {"requests_per_minute": 1}})
    q.request("batch")
    with pytest.raises(QuotaExceeded, match="limit of 1 requests per minute"):
        q.request("batch")
    for _ in range(50):
        q.request("alice")


def test_audio_budget_input_refused_output_charged(r):
    q = quotas(r, audio_seconds_per_hour=10.0)
    q.charge_audio("alice", 6.0)                         # a 6 s question
    with pytest.raises(QuotaExceeded) as e:
        q.charge_audio("alice", 5.0)                     # does not fit the 4 s left
    assert "does not fit what is left of the hourly budget of 10 audio seconds" in str(e.value)
    assert 3600 * 1.0 / 10 * 0.9 < e.value.retry_after_s <= 360.0 + 1   # 1 s of budget refills in 360 s
    with pytest.raises(ResourceExhausted, match="longer than the hourly budget") as e:
        q.charge_audio("bob", 11.0)                      # never fits: no retry time to offer
    assert not isinstance(e.value, QuotaExceeded)
    q.check_audio("alice")                               # not spent: turns may start
    q.charge_audio("alice", 8.0, force=True)             # a long reply overdraws ...
    with pytest.raises(QuotaExceeded) as e:
        q.check_audio("alice")                           # ... so the next turn waits
    assert 3600 * 0.4 - 5 < e.value.retry_after_s <= 3600 * 0.4 + 1
    q.check_audio("bob")


def test_running_turns_per_identity(r):
    q = quotas(r, turns=2)
    over: set[str] = set()
    q.begin_turn("alice", "t1", over.__contains__)
    q.begin_turn("alice", "t2", over.__contains__)
    with pytest.raises(QuotaExceeded) as e:
        q.begin_turn("alice", "t3", over.__contains__)
    assert "alice already runs 2 turns at once (quotas.turns)" in str(e.value) and e.value.retry_after_s > 0
    q.begin_turn("bob", "t4", over.__contains__)
    q.end_turn("alice", "t1")
    q.begin_turn("alice", "t3", over.__contains__)
    # a turn whose replica died never ends by itself: once is_over says so, it stops counting
    with pytest.raises(QuotaExceeded):
        q.begin_turn("alice", "t5", over.__contains__)
    over.add("t2")
    q.begin_turn("alice", "t5", over.__contains__)


def test_turns_older_than_the_turn_ttl_stop_counting(r):
    q = Quotas(r, QuotasSettings(turns=1), turn_ttl_s=1)
    q.begin_turn("alice", "t1", lambda _t: False)
    with pytest.raises(QuotaExceeded):
        q.begin_turn("alice", "t2", lambda _t: False)
    time.sleep(1.2)
    q.begin_turn("alice", "t2", lambda _t: False)


def test_admission_control_counts_every_identitys_turns(r):
    """limits.max_running_turns over the whole stack: beyond it any identity's new turn is refused
    at once with a retry delay; a refused turn is counted nowhere; an ended or abandoned turn frees
    its place; two replicas (two Quotas on the same Redis) share the count."""
    from orchestrator.quotas import RUNNING_KEY

    replicas = [Quotas(redis.Redis(connection_pool=r.connection_pool), QuotasSettings(turns=4), turn_ttl_s=60,
                       max_running_turns=3) for _ in range(2)]
    over: set[str] = set()
    replicas[0].begin_turn("alice", "t1", over.__contains__)
    replicas[1].begin_turn("bob", "t2", over.__contains__)
    replicas[0].begin_turn("carol", "t3", over.__contains__)
    for q, who in ((replicas[0], "alice"), (replicas[1], "dave")):
        with pytest.raises(QuotaExceeded) as e:
            q.begin_turn(who, "t4", over.__contains__)
        assert "the service is at capacity: 3 turns are running (limits.max_running_turns)" in str(e.value)
        assert e.value.retry_after_s > 0
    assert r.zcard("quota:dave:turns") == 0 and r.zcard("quota:alice:turns") == 1   # refused: counted nowhere
    replicas[1].end_turn("bob", "t2")
    replicas[1].begin_turn("dave", "t4", over.__contains__)
    over.add("t1")                                   # its replica died: is_over says so, the place frees
    replicas[0].begin_turn("alice", "t5", over.__contains__)
    assert {m.decode() for m in r.zrange(RUNNING_KEY, 0, -1)} == {"t3", "t4", "t5"}
    # the identity's own limit is still its own message
    q = Quotas(r, QuotasSettings(turns=1), turn_ttl_s=60, max_running_turns=100)
    with pytest.raises(QuotaExceeded) as e:
        q.begin_turn("alice", "t6", over.__contains__)
    assert "alice already runs 1 turns at once (quotas.turns)" in str(e.value)
