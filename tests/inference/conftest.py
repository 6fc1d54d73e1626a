"""Fixtures of the predict tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on this shared 2-core machine OpenMP barriers with 2 threads make
    EfficientNet forwards ~50× slower under load; results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
