import os

import pytest
import torch


# Tests import their helpers as `from utils import ...` and benchmark modules by name: `pythonpath` in pyproject.toml.
os.environ.setdefault("HF_HUB_OFFLINE", "0")


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: tiny matrices run several times faster than with two on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
