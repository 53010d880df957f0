"""pytest plugin exposing the local Hub. Load it from a test module with `pytest_plugins = ["hub_server.fixtures"]`.

Fixtures:
    local_hub: the session's `LocalHub` (one server on a free loopback port for the whole session).
    hub: the same server, emptied, with huggingface_hub pointed at it (`HF_ENDPOINT`, a fresh `HF_HOME`, `HF_TOKEN`)
        for one test. Parametrise it indirectly with `"regular"` (default: hf_xet installed and enabled, the server
        answers "regular" so Xet is never asked for) or `"lfs"` (`HF_HUB_DISABLE_XET=1`, binaries go through the LFS
        batch → PUT → verify path). Any 501 the server answered during the test fails it.
"""

from __future__ import annotations

import importlib

import pytest

from .app import UPLOAD_MODES, WRITE_TOKEN, LocalHub
from .client import configure_hub_client


@pytest.fixture(scope="session")
def local_hub():
    server = LocalHub().start()
    yield server
    server.stop()


@pytest.fixture
def hub(local_hub: LocalHub, request, tmp_path, monkeypatch) -> LocalHub:
    mode = getattr(request, "param", "regular")
    if mode not in UPLOAD_MODES:
        raise ValueError(f"hub fixture mode must be one of {UPLOAD_MODES}, got {mode!r}")
    if mode == "regular":
        # This mode exists to prove the client never falls into the Xet path: it must really be available.
        importlib.import_module("hf_xet")
    local_hub.reset(lfs_uploads=mode == "lfs")
    configure_hub_client(monkeypatch, local_hub.endpoint, str(tmp_path / "hf_home"), WRITE_TOKEN, mode == "lfs")
    yield local_hub
    if local_hub.unsupported:
        pytest.fail("the local Hub answered 501 (outside the implemented API subset):\n" +
                    "\n".join(local_hub.unsupported), pytrace=False)
