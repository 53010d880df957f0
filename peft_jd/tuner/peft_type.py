"""`PeftType.JDLORA`: checks the installed PEFT release and adds the member to PEFT's enum (idempotent).

PEFT's `register_peft_method` (called at the end of `peft_jd/tuner/__init__.py`, as PEFT's own tuners do) requires the
enum member to exist; `JDLoraConfig` uses it as its `peft_type`.
"""

from __future__ import annotations

import peft
from peft.utils.peft_types import PeftType

from .._compat import peft_problem
from ..core.layout import PEFT_TYPE


def check_peft_version(version: str = peft.__version__) -> None:
    """Fail early, with the fix, on a PEFT release whose tuner internals we have not tested."""
    problem = peft_problem(version)
    if problem:
        raise ImportError(problem)


def _add_peft_type_member() -> PeftType:
    """Adds `PeftType.JDLORA` to PEFT's (closed) enum if it is not there yet."""
    if PEFT_TYPE in PeftType.__members__:
        return PeftType[PEFT_TYPE]
    member = str.__new__(PeftType, PEFT_TYPE)
    member._name_ = PEFT_TYPE
    member._value_ = PEFT_TYPE
    member.__objclass__ = PeftType
    # EnumType.__setattr__ refuses to rebind members, so bypass it; the maps are what lookups by name/value use.
    type.__setattr__(PeftType, PEFT_TYPE, member)
    PeftType._member_map_[PEFT_TYPE] = member
    PeftType._value2member_map_[PEFT_TYPE] = member
    PeftType._member_names_.append(PEFT_TYPE)
    return member


check_peft_version()
JDLORA: PeftType = _add_peft_type_member()
