"""Fixtures of the bus and worker tests."""
from __future__ import annotations

import uuid

import pytest

from services.common.bus import Bus


@pytest.fixture
def bus(redis_url):
    b = Bus(redis_url, turn_ttl_s=60, turn_maxlen=1000, job_max_backlog=100, max_deliveries=2)
    yield b
    b.redis.close()


@pytest.fixture
def uid():
    return uuid.uuid4().hex[:12]
