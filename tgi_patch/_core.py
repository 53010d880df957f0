"""Access to the torch-only parts of peft-jd (format, bases store, kernels) inside TGI's Python environment.

`import peft_jd` registers the JD-LoRA tuner with PEFT and therefore needs peft>=0.21.2 and transformers>=5. TGI
3.3.7's image pins peft 0.14 and transformers 4.51, and upgrading transformers there disables every flash model of
TGI (its VLM modules import helpers that transformers 5 removed). The serving path only needs modules that depend on
torch, safetensors and huggingface_hub, so when the full package cannot be imported we expose the `peft_jd` package
without running its `__init__` (its PEFT registration) and import those submodules directly.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from types import ModuleType


logger = logging.getLogger(__name__)

_CORE_MODULES = ("errors", "format", "bases_store", "kernels")


def _install_package_shell() -> ModuleType:
    spec = importlib.util.find_spec("peft_jd")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("peft-jd is not installed in this Python environment: pip install --no-deps peft-jd")
    shell = importlib.util.module_from_spec(spec)
    shell.__doc__ = "peft-jd (serving modules only: the PEFT tuner needs newer peft/transformers)"
    sys.modules["peft_jd"] = shell
    return shell


def import_core(name: str) -> ModuleType:
    """Returns `peft_jd.<name>` for `name` in ("errors", "format", "bases_store", "kernels").

    Falls back to a package shell when the full `peft_jd` package fails to import (in TGI's image: its PEFT and
    transformers versions); errors of the serving modules themselves are raised.
    """
    if name not in _CORE_MODULES:
        raise ValueError(f"tgi_patch only uses the peft_jd modules {_CORE_MODULES}, not {name!r}")
    if "peft_jd" not in sys.modules:
        try:
            importlib.import_module("peft_jd")
        except Exception as exc:  # noqa: BLE001 - an older PEFT fails in several ways (ImportError, AttributeError…)
            logger.info("peft_jd's PEFT tuner is unavailable here (%s); using its serving modules only.", exc)
            _install_package_shell()
    return importlib.import_module(f"peft_jd.{name}")
