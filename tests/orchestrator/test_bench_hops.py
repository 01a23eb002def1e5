"""`bench hops` over this session's real redis-server: every hop is timed through the Bus."""
from __future__ import annotations

from orchestrator.bench_hops import redis_hops


def test_redis_hops_are_timed_through_the_bus(redis_url):
    r = redis_hops(redis_url, n=5)
    assert set(r) == {"stream entry", "work job"}
    assert all(len(v) == 5 and all(0 < x < 2.0 for x in v) for v in r.values())
