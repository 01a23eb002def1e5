"""Fixtures of the orchestrator tests."""
from __future__ import annotations

import pytest
import redis


@pytest.fixture
def private_redis(redis_url):
    """A database of this test session's redis-server for one test alone, empty before and
    after (session caps and quotas count everything in their database)."""
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/7", protocol=2)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()
