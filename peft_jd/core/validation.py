"""The one validation of a sigma adapter against its bases, used by every loader (tuner, bulk load, export, Hub
pull, TGI and vLLM serving).

Errors (all `JDLoraError`): `SigmaTypeMismatchError` for full vs diagonal Σ, `ShapeMismatchError` for a rank or Σ
shape that disagrees with the bases, `BasesMismatchError` for an adapter made against other bases (fingerprint,
cluster out of range), `BasesNotFoundError` for a module the bases do not cover, `AdapterFormatError` for a file
that is not what the format says (no Σ, stray tensors, NaN/inf, non-float Σ).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import (
    AdapterFormatError,
    BasesMismatchError,
    BasesNotFoundError,
    ShapeMismatchError,
    SigmaTypeMismatchError,
)
from .format import BasesConfig, check_finite
from .layout import PEFT_KEY_PREFIX, SIGMA_KEY_SUFFIX
from .spec import AdapterSpec


SigmaOrShape = Union[torch.Tensor, Sequence[int]]


def split_adapter_keys(keys, spec: AdapterSpec, path: str) -> tuple[dict[str, str], list[str]]:
    """Splits tensor names of an adapter file into Σ (module key → tensor name) and `modules_to_save` tensors.

    Raises `AdapterFormatError` for a name that is neither, or when the file holds no Σ at all.
    """
    sigma_keys: dict[str, str] = {}
    saved: list[str] = []
    saved_modules = tuple(spec.modules_to_save or ())
    for key in keys:
        if key.startswith(PEFT_KEY_PREFIX) and key.endswith(SIGMA_KEY_SUFFIX):
            sigma_keys[key[len(PEFT_KEY_PREFIX) : -len(SIGMA_KEY_SUFFIX)]] = key
        elif saved_modules and any(f".{m}." in f".{key}" for m in saved_modules):
            saved.append(key)
        else:
            raise AdapterFormatError(
                f"adapter {spec.name!r} ({path}): unexpected tensor {key!r}; a JD-LoRA adapter file holds only "
                f"`…{SIGMA_KEY_SUFFIX}` tensors (and those of its `modules_to_save`)."
            )
    if not sigma_keys:
        raise AdapterFormatError(f"adapter {spec.name!r}: {path} holds no Σ tensor.")
    return sigma_keys, saved


def _open_error(spec: AdapterSpec, path: str, exc: Exception) -> AdapterFormatError:
    return AdapterFormatError(
        f"adapter {spec.name!r}: {path} is not a readable safetensors file ({exc}); re-download or re-export it."
    )


def read_sigma_shapes(spec: AdapterSpec, path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Module key → Σ shape, from the safetensors header only (no tensor data is read)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AdapterFormatError(f"adapter {spec.name!r}: {path} does not exist; the adapter has no Σ weights.")
    try:
        with safe_open(path, framework="pt") as f:
            sigma_keys, _ = split_adapter_keys(list(f.keys()), spec, path)
            return {module: tuple(f.get_slice(key).get_shape()) for module, key in sigma_keys.items()}
    except (SafetensorError, OSError) as exc:
        raise _open_error(spec, path, exc) from exc


def read_adapter_tensors(
    spec: AdapterSpec, path: str | os.PathLike
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`(Σ by module key, modules_to_save tensors by file key)` of an adapter weights file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AdapterFormatError(f"adapter {spec.name!r}: {path} does not exist; the adapter has no Σ weights.")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise _open_error(spec, path, exc) from exc
    sigma_keys, saved = split_adapter_keys(list(tensors), spec, path)
    return {module: tensors[key] for module, key in sigma_keys.items()}, {key: tensors[key] for key in saved}


def validate_against_bases(
    spec: AdapterSpec,
    sigmas: Mapping[str, SigmaOrShape],
    bases_config: BasesConfig,
    bases_label: Optional[str] = None,
) -> None:
    """Checks an adapter's config and Σ against the bases it will be served with.

    Args:
        spec: The adapter's parsed config.
        sigmas: Module key → Σ tensor (values are then checked too) or Σ shape (header-only check).
        bases_config: The bases' `jd_bases_config.json`.
        bases_label: How to name the bases in messages.
    """
    label = bases_label or "of this collection"
    who = f"adapter {spec.name!r}"
    if spec.sigma_type != bases_config.sigma_type:
        raise SigmaTypeMismatchError(
            f"{who} has sigma_type={spec.sigma_type!r} but bases {label} were compressed for "
            f"sigma_type={bases_config.sigma_type!r}. Full and diagonal collections need separate models."
        )
    if spec.r != bases_config.r:
        raise ShapeMismatchError(f"{who} has r={spec.r} but bases {label} have rank {bases_config.r}.")
    for module_key in sigmas:
        if module_key in bases_config.modules and spec.rank_of(module_key) != bases_config.rank_of(module_key):
            raise ShapeMismatchError(
                f"{who} has rank {spec.rank_of(module_key)} for module {module_key} but bases {label} have rank "
                f"{bases_config.rank_of(module_key)} there; its `rank_pattern` belongs to another collection."
            )
    expected = spec.bases_fingerprint
    if expected and bases_config.fingerprint and expected != bases_config.fingerprint:
        raise BasesMismatchError(
            f"{who} was compressed against bases with fingerprint {expected[:12]}…, but {label} has "
            f"{bases_config.fingerprint[:12]}…. The bases were re-compressed or modified; load the bases revision the "
            "adapter records, or re-project the adapter with `peft-jd add`."
        )
    if not sigmas:
        raise AdapterFormatError(f"{who} ({spec.source}) holds no Σ tensor.")
    for module_key, sigma in sigmas.items():
        module = bases_config.modules.get(module_key)
        if module is None:
            raise BasesNotFoundError(
                f"{who} has a Σ for module {module_key!r}, which bases {label} do not cover. The adapter belongs to "
                "another collection (or targets a module that was not compressed)."
            )
        shape = tuple(sigma.shape) if isinstance(sigma, torch.Tensor) else tuple(sigma)
        want = spec.sigma_shape(module_key)
        if shape != want:
            raise ShapeMismatchError(
                f"Σ of {who} for module {module_key} has shape {shape}, expected {want} "
                f"(r={spec.rank_of(module_key)}, "
                f"sigma_type={spec.sigma_type!r})."
            )
        cluster = spec.cluster_of(module_key)
        if not 0 <= cluster < module.num_clusters:
            raise BasesMismatchError(
                f"{who} is assigned cluster {cluster} for module {module_key}, but bases {label} have "
                f"{module.num_clusters} cluster(s) for it. The adapter was compressed against other bases."
            )
        if isinstance(sigma, torch.Tensor):
            if not sigma.is_floating_point():
                raise AdapterFormatError(f"Σ of {who} for module {module_key} has dtype {sigma.dtype}, not float.")
            check_finite(sigma, f"Σ of {who} for module {module_key} ({spec.source})")
