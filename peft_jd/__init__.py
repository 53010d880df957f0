"""peft-jd: serve thousands of LoRA adapters on one base model through joint compression (JD-LoRA).

`import peft_jd` registers the `JDLORA` method with PEFT, after which `PeftModel.from_pretrained` loads JD-LoRA
sigma adapters like any other PEFT adapter.
"""

from ._registration import register as _register


_register()

from .bulk import load_adapters  # noqa: E402
from .compression import CompressionReport, add_adapters, compress  # noqa: E402
from .errors import (  # noqa: E402
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
from .export import LoraExport, to_lora  # noqa: E402
from .tuner import BASE_ADAPTER_NAME, JDLoraConfig, JDLoraLayer, JDLoraModel  # noqa: E402


__version__ = "0.1.0"

__all__ = [
    "BASE_ADAPTER_NAME",
    "AdapterFormatError",
    "AdapterNameError",
    "CompressionReport",
    "BaseModelMismatchError",
    "BasesMismatchError",
    "BasesNotFoundError",
    "JDLoraConfig",
    "JDLoraError",
    "JDLoraLayer",
    "JDLoraModel",
    "LoraExport",
    "ShapeMismatchError",
    "SigmaTypeMismatchError",
    "UnknownAdapterError",
    "add_adapters",
    "compress",
    "load_adapters",
    "to_lora",
]
