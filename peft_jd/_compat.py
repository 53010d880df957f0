"""Which PEFT releases the tuner supports, decided without importing PEFT (a serving image may hold another one)."""

from __future__ import annotations

import importlib.metadata
from typing import Optional

from packaging.version import Version


SUPPORTED_PEFT = (Version("0.21.2"), Version("0.22.0"))


def peft_problem(version: Optional[str] = None) -> Optional[str]:
    """Why the installed (or given) PEFT release cannot host the tuner, with the fix; `None` when it can."""
    low, high = SUPPORTED_PEFT
    if version is None:
        try:
            version = importlib.metadata.version("peft")
        except importlib.metadata.PackageNotFoundError:
            return f"peft is not installed; install it with: pip install 'peft>={low},<{high}'"
    if not (low <= Version(version) < high):
        return (
            f"peft-jd supports peft>={low},<{high}, but peft=={version} is installed. "
            f"Install a supported release: pip install 'peft>={low},<{high}'."
        )
    return None
