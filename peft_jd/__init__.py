"""peft-jd: serve thousands of LoRA adapters on one base model through joint compression (JD-LoRA).

`import peft_jd` registers the `JDLORA` method with PEFT, after which `PeftModel.from_pretrained` loads JD-LoRA
sigma adapters like any other PEFT adapter.

Layers (see docs/architecture.md): `peft_jd.core` and `peft_jd.kernels` import neither peft nor transformers and are
all a serving engine needs; the tuner (`peft_jd.tuner`), bulk loading, export and compression build on PEFT. When PEFT
is not installed (a serving image), this package exposes the core only, and the PEFT-level names raise an ImportError
that says what to install.
"""

import warnings

from ._compat import peft_problem
from .core.errors import (
    AdapterFormatError,
    AdapterNameError,
    BaseModelMismatchError,
    BasesMismatchError,
    BasesNotFoundError,
    JDLoraError,
    ShapeMismatchError,
    SigmaTypeMismatchError,
    UnknownAdapterError,
)


__version__ = "0.1.0"

_PEFT_NAMES = (
    "BASE_ADAPTER_NAME",
    "CompressionReport",
    "JDLoraConfig",
    "JDLoraLayer",
    "JDLoraModel",
    "LoraExport",
    "compress",
    "extend_collection",
    "load_adapters",
    "to_lora",
)

__all__ = [
    "AdapterFormatError",
    "AdapterNameError",
    "BaseModelMismatchError",
    "BasesMismatchError",
    "BasesNotFoundError",
    "JDLoraError",
    "ShapeMismatchError",
    "SigmaTypeMismatchError",
    "UnknownAdapterError",
    *_PEFT_NAMES,
]

_TUNER_PROBLEM = peft_problem()
if _TUNER_PROBLEM is None:
    try:
        from .bulk import load_adapters  # noqa: F401
        from .compression import CompressionReport, compress, extend_collection  # noqa: F401
        from .export import LoraExport, to_lora  # noqa: F401
        from .tuner import BASE_ADAPTER_NAME, JDLoraConfig, JDLoraLayer, JDLoraModel  # noqa: F401
    except ImportError as exc:
        # A third-party module that cannot be imported here (another transformers, a broken install) disables the
        # tuner only; an import error inside peft-jd itself is a bug and is raised.
        if exc.name is None or exc.name.split(".")[0] in ("peft_jd", "hub_tools"):
            raise
        _TUNER_PROBLEM = f"importing it failed ({exc})."
if _TUNER_PROBLEM is not None and "not installed" not in _TUNER_PROBLEM:
    # A serving image may pin other peft/transformers: the core stays usable, the tuner says why it is missing.
    warnings.warn(f"peft-jd's PEFT tuner is unavailable: {_TUNER_PROBLEM} Only peft_jd.core is usable.", stacklevel=2)


def __getattr__(name: str):
    if name in _PEFT_NAMES:
        raise ImportError(f"peft_jd.{name} needs the PEFT tuner: {_TUNER_PROBLEM}")
    raise AttributeError(f"module 'peft_jd' has no attribute {name!r}")
