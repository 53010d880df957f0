"""Points an already-imported huggingface_hub at the local Hub.

huggingface_hub reads `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_DISABLE_XET`, … once, at import time, into
`huggingface_hub.constants` (and `hf_api.api`, the instance behind module-level functions such as `file_exists`, keeps
its endpoint from then on). Setting the environment is therefore not enough inside a test session where transformers or
PEFT imported it long before: this module sets the environment (for subprocesses) *and* rewrites every derived
constant, through a `monkeypatch`-like object so that everything is undone afterwards.
"""

from __future__ import annotations

import os
from typing import Protocol


class _Patcher(Protocol):
    def setattr(self, target, name: str, value, raising: bool = True) -> None: ...

    def setenv(self, name: str, value: str, prepend=None) -> None: ...

    def delenv(self, name: str, raising: bool = True) -> None: ...


def configure_hub_client(patcher: _Patcher, endpoint: str, home: str, token: str, disable_xet: bool) -> None:
    """Routes huggingface_hub (endpoint, cache, token, Xet switch) to a local Hub for the patcher's lifetime.

    Args:
        patcher: A `pytest.MonkeyPatch` (or anything with its `setattr`/`setenv`/`delenv`).
        endpoint: Base URL of the local Hub, e.g. `http://127.0.0.1:41234`.
        home: Directory used as `HF_HOME` (cache under `home/hub`, token file, Xet cache).
        token: Value of `HF_TOKEN`.
        disable_xet: Set `HF_HUB_DISABLE_XET=1` (uploads go through the LFS batch API).
    """
    from huggingface_hub import constants, hf_api

    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": home,
        "HF_HUB_CACHE": os.path.join(home, "hub"),
        "HF_TOKEN": token,
        "HF_HUB_DISABLE_XET": "1" if disable_xet else "0",
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for name in ("HF_TOKEN_PATH", "HF_XET_CACHE", "HF_ASSETS_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        patcher.delenv(name, raising=False)
    for name, value in env.items():
        patcher.setenv(name, value)

    old_home, old_endpoint = constants.HF_HOME, constants.ENDPOINT
    for name in dir(constants):
        value = getattr(constants, name)
        if name.isupper() and isinstance(value, str):
            if value.startswith(old_home):
                patcher.setattr(constants, name, home + value[len(old_home):])
            elif value.startswith(old_endpoint):
                patcher.setattr(constants, name, endpoint + value[len(old_endpoint):])
    # Set explicitly too: a user environment may have pointed these outside HF_HOME.
    for name, value in {"HF_HUB_CACHE": env["HF_HUB_CACHE"], "HF_XET_CACHE": os.path.join(home, "xet"),
                        "HF_TOKEN_PATH": os.path.join(home, "token"),
                        "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens")}.items():
        patcher.setattr(constants, name, value)
    patcher.setattr(constants, "HF_HUB_DISABLE_XET", disable_xet)
    patcher.setattr(constants, "HF_HUB_OFFLINE", False)
    patcher.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    patcher.setattr(hf_api.api, "endpoint", endpoint)


def set_offline(patcher: _Patcher, offline: bool = True) -> None:
    """Switches huggingface_hub's offline mode (`HF_HUB_OFFLINE`) on or off."""
    from huggingface_hub import constants

    patcher.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    patcher.setattr(constants, "HF_HUB_OFFLINE", offline)
