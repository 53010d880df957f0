"""The `JDLORA` PEFT tuner: config, layers and model, registered with PEFT at the end of this file like PEFT's own
tuners."""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .adapters import SigmaAdapter, split_checkpoint
from .config import JDLoraConfig
from .layer import JDLoraLayer, Linear
from .model import JDLoraModel
from .peft_type import JDLORA
from .slots import BASE_ADAPTER_NAME, SlotTable, check_adapter_name


__all__ = [
    "BASE_ADAPTER_NAME",
    "JDLORA",
    "JDLoraConfig",
    "JDLoraLayer",
    "JDLoraModel",
    "Linear",
    "SigmaAdapter",
    "SlotTable",
    "check_adapter_name",
    "split_checkpoint",
]


def _register() -> None:
    # Idempotent: a reloaded module finds its own classes registered; a second copy of peft-jd is an error.
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(JDLORA)
    if registered is JDLoraModel:
        return
    if registered is not None:
        raise RuntimeError(
            f"PEFT already has a method registered as {JDLORA.value!r} ({registered.__module__}); two copies of "
            "peft-jd are imported."
        )
    register_peft_method(name=JDLORA.value.lower(), config_cls=JDLoraConfig, model_cls=JDLoraModel, prefix="jd_")


_register()
