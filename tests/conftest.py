import os
import shutil

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


@pytest.fixture
def collection(collection_source, tmp_path):
    """A private copy, for a test to modify, of the module's (module-scoped) `collection_source` fixture."""
    root = tmp_path / "collection"
    shutil.copytree(collection_source, root)
    return root
