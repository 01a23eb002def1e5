"""Shared set-up of the LLM-stage tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: these tests run many tiny ops, and on a shared
    2-core machine a second thread contends with other users (10-20x slower). Restored after.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
