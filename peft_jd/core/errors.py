"""Exceptions raised by peft-jd. Each message names the adapter/module/file at fault and the fix."""

import warnings


_WARNED: set[tuple] = set()


def warn_once(key: tuple, message: str, stacklevel: int = 2) -> None:
    """Warns the first time `key` is seen in this process (e.g. once per pair of names, not once per adapter)."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=stacklevel + 1)


class JDLoraError(ValueError):
    """Base class of peft-jd errors (a `ValueError`, so PEFT-style `except ValueError` keeps working)."""


class BasesNotFoundError(JDLoraError):
    """The shared bases an adapter points to cannot be found (local path or Hub repo/revision)."""


class BasesMismatchError(JDLoraError):
    """An adapter was compressed against other bases (collection, revision or fingerprint) than the loaded ones."""


class ShapeMismatchError(JDLoraError):
    """Bases, Σ and base-model layer shapes disagree."""


class BaseModelMismatchError(JDLoraError):
    """The adapter or bases were made for another base model."""


class SigmaTypeMismatchError(JDLoraError):
    """Full and diagonal Σ adapters (or different ranks) were mixed in one model."""


class UnknownAdapterError(JDLoraError):
    """An adapter name passed in `adapter_names` is not loaded."""


class AdapterFormatError(JDLoraError):
    """An adapter or LoRA file is malformed: missing tensors, NaN/inf values, unexpected keys."""


class AdapterNameError(JDLoraError):
    """An adapter name cannot be used: reserved, empty, containing a dot, or clashing with a torch module attribute."""


class DestinationError(JDLoraError):
    """An output folder exists and is not a peft-jd artefact of the kind being written (nothing was written)."""


class CollectionLockedError(JDLoraError):
    """Another peft-jd process holds the writers' lock of a collection."""


class UsageError(JDLoraError):
    """A command-line usage error (arguments that contradict each other); `peft-jd` exits with status 2."""
