import os
import sys

import pytest
import torch


# Tests import their helpers as `from utils import ...`.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "0")


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: tiny matrices run several times faster than with two on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
