from __future__ import annotations

import os
import pytest
import torch

from services.common.redis_server import redis_server
from tests.parity import Fixtures, fixture_root

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def fixtures() -> Fixtures:
    """The golden fixture root. Missing: skip, except under CI where it is a failure."""
    root = fixture_root()
    if not (root / "model_config.json").is_file():
        msg = f"golden fixture root {root} not found (set BAICHUAN_AUDIO_FIXTURES)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return Fixtures(root)


@pytest.fixture(scope="session")
def redis_url():
    """A private redis-server for this test session on a free loopback port.

    `make test` exports BAICHUAN_AUDIO_TEST_REDIS_URL for the one it started; otherwise
    one is started here from the redis-server binary."""
    url = os.environ.get("BAICHUAN_AUDIO_TEST_REDIS_URL")
    if url:
        yield url
        return
    try:
        with redis_server() as url:
            yield url
    except RuntimeError as e:
        pytest.fail(str(e))
