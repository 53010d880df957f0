"""Registers the `JDLORA` PEFT method with PEFT (idempotent)."""

from __future__ import annotations

import peft
from packaging.version import Version
from peft.utils.peft_types import PeftType


SUPPORTED_PEFT = (Version("0.21.2"), Version("0.22.0"))
PEFT_TYPE_NAME = "JDLORA"


def check_peft_version(version: str = peft.__version__) -> None:
    """Fail early, with the fix, on a PEFT release whose tuner internals we have not tested."""
    low, high = SUPPORTED_PEFT
    if not (low <= Version(version) < high):
        raise ImportError(
            f"peft-jd supports peft>={low},<{high}, but peft=={version} is installed. "
            f"Install a supported release: pip install 'peft>={low},<{high}'."
        )


def _add_peft_type_member() -> PeftType:
    """Adds `PeftType.JDLORA` to PEFT's (closed) enum if it is not there yet."""
    if PEFT_TYPE_NAME in PeftType.__members__:
        return PeftType[PEFT_TYPE_NAME]
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    # EnumType.__setattr__ refuses to rebind members, so bypass it; the maps are what lookups by name/value use.
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    return member


def register() -> None:
    """Registers config and tuner classes with PEFT. Safe to call any number of times."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .tuner.config import JDLoraConfig
    from .tuner.model import JDLoraModel

    check_peft_version()
    peft_type = _add_peft_type_member()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is JDLoraModel:
        return
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        raise RuntimeError(
            f"PEFT already has a method registered as {PEFT_TYPE_NAME!r} "
            f"({PEFT_TYPE_TO_TUNER_MAPPING[peft_type].__module__}); two copies of peft-jd are imported."
        )
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=JDLoraConfig, model_cls=JDLoraModel, prefix="jd_")
