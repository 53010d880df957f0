"""Process-wide store of shared bases: one copy per (location, revision, subfolder), referenced by every adapter."""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors.torch import load_file

from .errors import BasesMismatchError, BasesNotFoundError
from .format import BasesConfig, looks_like_local_path
from .hub import hub_download
from .layout import BASES_CONFIG_NAME, BASES_WEIGHTS_NAME


@dataclass(frozen=True)
class BasesKey:
    """Identity of a bases collection: a resolved local path or Hub id, a revision and a subfolder."""

    location: str
    revision: Optional[str] = None
    subfolder: Optional[str] = None

    def describe(self) -> str:
        text = self.location
        if self.subfolder:
            text += f"/{self.subfolder}"
        if self.revision:
            text += f"@{self.revision}"
        return text


class SharedBases:
    """The U, V tensors of one bases collection, loaded once and shared by all adapters pointing to it.

    Args:
        key: Where the bases came from.
        config: Content of `jd_bases_config.json`.
        tensors: Per module key, `(U, V)` with shapes `(c, out_features, r)` and `(c, in_features, r)`.
        directory: Local directory the files were read from.
    """

    def __init__(
        self, key: BasesKey, config: BasesConfig, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]], directory: str
    ):
        self.key = key
        self.config = config
        self.tensors = tensors
        self.directory = directory
        # Copies in other dtypes/devices, made once and shared like the originals.
        self._placed: dict[tuple[str, torch.dtype, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def fingerprint(self) -> str:
        return self.config.fingerprint

    def module(
        self, module_key: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(U, V)` of a module, optionally in another dtype/device (one shared copy per placement).

        Raises `BasesNotFoundError` naming the module if the bases do not cover it.
        """
        try:
            U, V = self.tensors[module_key]
        except KeyError:
            raise BasesNotFoundError(
                f"bases {self.key.describe()} have no entry for module {module_key!r}; the adapter targets a module "
                "that was not compressed into this collection. Re-run `peft-jd compress` with that module, or load "
                "the adapter on the base model it was compressed for."
            ) from None
        dtype = dtype or U.dtype
        device = torch.device(device) if device is not None else U.device
        if dtype == U.dtype and device == U.device:
            return U, V
        key = (module_key, dtype, str(device))
        if key not in self._placed:
            self._placed[key] = (U.to(device=device, dtype=dtype), V.to(device=device, dtype=dtype))
        return self._placed[key]

    def nbytes(self) -> int:
        return sum(U.nbytes + V.nbytes for U, V in self.tensors.values())


_STORE: weakref.WeakValueDictionary[BasesKey, SharedBases] = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


def resolve_bases_key(bases: str, revision: Optional[str] = None, subfolder: Optional[str] = None) -> BasesKey:
    """Normalises a bases reference: local directories become absolute paths (revision ignored)."""
    local = os.path.join(bases, subfolder or "")
    if os.path.isdir(local):
        return BasesKey(location=os.path.abspath(bases), revision=None, subfolder=subfolder or None)
    return BasesKey(location=bases, revision=revision, subfolder=subfolder or None)


def _download_bases(key: BasesKey, **hub_kwargs) -> str:
    paths = hub_download(
        key.location,
        [BASES_CONFIG_NAME, BASES_WEIGHTS_NAME],
        subfolder=key.subfolder,
        revision=key.revision,
        what="bases",
        error_cls=BasesNotFoundError,
        **hub_kwargs,
    )
    return os.path.dirname(paths[0])


def _read_bases_dir(directory: str, key: BasesKey) -> SharedBases:
    config_path = os.path.join(directory, BASES_CONFIG_NAME)
    weights_path = os.path.join(directory, BASES_WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise BasesNotFoundError(
                f"bases directory {directory!r} has no {os.path.basename(path)}; it is missing or was not written "
                "completely. Re-run the compression or pull the bases again."
            )
    config = BasesConfig.from_file(config_path)
    flat = load_file(weights_path)
    tensors = {}
    for module_key in config.modules:
        try:
            tensors[module_key] = (flat[f"{module_key}.U"], flat[f"{module_key}.V"])
        except KeyError:
            raise BasesNotFoundError(f"{weights_path} lacks the U/V tensors of module {module_key!r}.") from None
    return SharedBases(key, config, tensors, directory)


def load_shared_bases(
    bases: str,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
    expected_fingerprint: Optional[str] = None,
    adapter_name: str = "<adapter>",
    **hub_kwargs,
) -> SharedBases:
    """Returns the shared bases for a reference, loading them on first use.

    Args:
        bases: Local directory or Hub repo id.
        revision: Hub revision (commit sha) pin.
        subfolder: Folder of the bases inside `bases`.
        expected_fingerprint: The fingerprint recorded in the adapter; a mismatch raises `BasesMismatchError`.
        adapter_name: Name used in error messages.
        hub_kwargs: Passed to `huggingface_hub.hf_hub_download` (`token`, `cache_dir`, `local_files_only`, …).
    """
    if not bases:
        raise BasesNotFoundError(
            f"adapter {adapter_name!r} has no `bases` in its config; it cannot be loaded without its shared bases."
        )
    key = resolve_bases_key(bases, revision, subfolder)
    with _LOCK:
        shared = _STORE.get(key)
        if shared is None:
            local_dir = os.path.join(key.location, key.subfolder or "")
            if os.path.isdir(local_dir):
                directory = local_dir
            elif looks_like_local_path(key.location):
                raise BasesNotFoundError(
                    f"bases directory {local_dir!r} (needed by adapter {adapter_name!r}) does not exist. Copy or pull "
                    "the collection's bases there, or fix `bases` in the adapter config."
                )
            else:
                directory = _download_bases(key, **hub_kwargs)
            shared = _read_bases_dir(directory, key)
            _STORE[key] = shared
    if expected_fingerprint and shared.fingerprint and expected_fingerprint != shared.fingerprint:
        raise BasesMismatchError(
            f"adapter {adapter_name!r} was compressed against bases with fingerprint {expected_fingerprint[:12]}…, "
            f"but {key.describe()} has {shared.fingerprint[:12]}…. The bases were re-compressed or modified; load the "
            "bases revision the adapter records, or re-project the adapter with `peft-jd add`."
        )
    return shared
