"""Lossless export of a JD-LoRA adapter to a plain rank-r PEFT LoRA (`B' = scaling · U Σ`, `A' = Vᵀ`).

Both entry points validate the adapter with the core's `validate_against_bases`, like every loader: `r` is checked
against Σ and the bases, a cluster out of range is a `BasesMismatchError`, a wrong Σ shape a `ShapeMismatchError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from .bulk import read_sigma_adapter
from .core import (
    ADAPTER_WEIGHTS_NAME,
    BASES_CONFIG_NAME,
    KIND_LORA_EXPORT,
    PEFT_KEY_PREFIX,
    AdapterSpec,
    DestinationError,
    SharedBases,
    UnknownAdapterError,
    atomic_directory,
    is_collection_root,
    is_jd_adapter_dir,
    load_shared_bases,
    read_marker,
    validate_against_bases,
    write_adapter_config,
)
from .tuner import JDLoraModel, split_checkpoint


@dataclass
class LoraExport:
    """A JD-LoRA adapter rewritten as a standard PEFT LoRA.

    Args:
        config: The `LoraConfig` (rank r, `lora_alpha = r`, so PEFT's scaling is 1; the JD scaling is in `lora_B`).
        state_dict: PEFT checkpoint tensors (`base_model.model.<module>.lora_A.weight` / `lora_B.weight`, plus the
            adapter's `modules_to_save` tensors).
        read_from: Local folders the export was read from (adapter, bases); `save_pretrained` never replaces them.
    """

    config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    read_from: list[str] = field(default_factory=list)

    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool = False) -> None:
        """Writes `adapter_config.json` + `adapter_model.safetensors`, atomically, loadable by any LoRA server.

        An existing non-empty `save_directory` is replaced only when it is an earlier LoRA export by peft-jd, or
        with `overwrite=True`. A collection, a sigma adapter, bases, or a folder holding what this export was read
        from are never replaced.

        Raises:
            `DestinationError`: `save_directory` may not be replaced; nothing was written.
        """
        check_export_destination(save_directory, self.read_from)
        with atomic_directory(save_directory, overwrite=overwrite, kind=KIND_LORA_EXPORT) as tmp:
            save_file(
                {k: v.contiguous() for k, v in self.state_dict.items()},
                tmp / ADAPTER_WEIGHTS_NAME,
                metadata={"format": "pt"},
            )
            write_adapter_config(tmp, self.config)


def check_export_destination(destination: str | os.PathLike, read_from: list[str] = ()) -> None:
    """Raises `DestinationError` for a folder a LoRA export must never replace, even with `overwrite`: a
    collection root, a sigma adapter, a bases folder, another kind of peft-jd artefact, or a folder holding one of
    `read_from`."""
    target = Path(destination)
    if not target.is_dir():
        return
    found = read_marker(target)
    what = None
    if is_collection_root(target):
        what = "a JD-LoRA collection"
    elif is_jd_adapter_dir(target):
        what = "a JD-LoRA sigma adapter"
    elif (target / BASES_CONFIG_NAME).is_file():
        what = "JD-LoRA bases"
    elif found not in (None, KIND_LORA_EXPORT):
        what = f"a peft-jd {found}"
    else:
        resolved = target.resolve()
        for source in read_from:
            source_path = Path(source).resolve()
            if source_path == resolved or resolved in source_path.parents:
                what = f"the folder holding {source}, which this export reads"
                break
    if what:
        raise DestinationError(
            f"{target} is {what}; a LoRA export never replaces it, not even with --overwrite. Choose another output "
            "folder."
        )


def _lora_factors(
    U: torch.Tensor, V: torch.Tensor, sigma: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(lora_A, lora_B) = (Vᵀ, scaling · U Σ)` computed in float64."""
    sigma = sigma.detach().double()
    sigma = sigma if sigma.dim() == 2 else torch.diag(sigma)
    lora_b = scaling * (U.double() @ sigma)
    return V.double().T.to("cpu", dtype).contiguous(), lora_b.to("cpu", dtype).contiguous()


def _target_modules(spec: AdapterSpec, module_keys) -> list[str] | str:
    targets = spec.config.get("target_modules")
    if isinstance(targets, str):
        return targets
    return sorted(targets) if targets else sorted(module_keys)


def _export(
    spec: AdapterSpec,
    sigmas: dict[str, torch.Tensor],
    saved_modules: dict[str, torch.Tensor],
    shared: SharedBases,
    dtype: torch.dtype,
    read_from: list[str],
) -> LoraExport:
    validate_against_bases(spec, sigmas, shared.config, shared.key.describe())
    state_dict = {}
    for module_key, sigma in sigmas.items():
        U, V = shared.module(module_key)
        cluster = spec.cluster_of(module_key)
        lora_a, lora_b = _lora_factors(U[cluster], V[cluster], sigma, spec.scaling, dtype)
        state_dict[f"{PEFT_KEY_PREFIX}{module_key}.lora_A.weight"] = lora_a
        state_dict[f"{PEFT_KEY_PREFIX}{module_key}.lora_B.weight"] = lora_b
    state_dict.update({key: tensor.detach().to("cpu") for key, tensor in saved_modules.items()})
    # lora_alpha = r everywhere (scaling 1: Σ already holds it); modules with their own rank say so in both patterns.
    rank_pattern = {key: spec.rank_of(key) for key in sigmas if spec.rank_of(key) != spec.r}
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.r,
        rank_pattern=rank_pattern,
        alpha_pattern=dict(rank_pattern),
        target_modules=_target_modules(spec, sigmas),
        modules_to_save=spec.modules_to_save,
        lora_dropout=0.0,
        bias="none",
        task_type=spec.config.get("task_type"),
        base_model_name_or_path=spec.base_model_name_or_path,
        inference_mode=True,
    )
    return LoraExport(config=config, state_dict=state_dict, read_from=read_from)


def to_lora(model, adapter_name: str = "default", dtype: torch.dtype = torch.float32) -> LoraExport:
    """Exports one loaded JD-LoRA adapter as an exact rank-r PEFT LoRA.

    Args:
        model: A `PeftModel` holding the adapter.
        adapter_name: The adapter to export.
        dtype: dtype of the exported factors.

    Returns:
        A [`LoraExport`]; call `.save_pretrained(dir)` to write it.
    """
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, JDLoraModel):
        raise TypeError(f"expected a PeftModel with JD-LoRA adapters, got {type(model).__name__}.")
    if adapter_name not in tuner.peft_config:
        raise UnknownAdapterError(f"adapter {adapter_name!r} is not loaded; loaded: {sorted(tuner.peft_config)[:10]}")
    spec = tuner.peft_config[adapter_name].to_spec(adapter_name)
    # Exactly what `save_pretrained` would write for the adapter, so modules_to_save come along.
    checkpoint = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    sigmas, saved_modules = split_checkpoint(spec, checkpoint, f"adapter {adapter_name!r} of the model")
    shared = tuner.shared_bases
    return _export(spec, sigmas, saved_modules, shared, dtype, read_from=[shared.directory])


def export_adapter_to_lora(
    adapter: str,
    revision: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    subfolder: Optional[str] = None,
    **hub_kwargs,
) -> LoraExport:
    """Exports a sigma adapter from its files (no base model needed) as an exact rank-r PEFT LoRA.

    Args:
        adapter: Sigma adapter directory or Hub repo id.
        revision: Hub revision of the adapter.
        dtype: dtype of the exported factors.
        subfolder: Folder of the adapter inside `adapter` (collection repos).
        hub_kwargs: Passed to huggingface_hub downloads (`token`, `cache_dir`, …).
    """
    read = read_sigma_adapter(adapter, revision, subfolder, **hub_kwargs)
    spec = read.spec
    location, bases_revision, bases_subfolder = spec.bases_reference()
    shared = load_shared_bases(
        location, bases_revision, bases_subfolder, spec.bases_fingerprint, spec.name, **hub_kwargs
    )
    local_adapter = os.path.join(adapter, subfolder or "")
    read_from = [shared.directory] + ([local_adapter] if os.path.isdir(local_adapter) else [])
    return _export(spec, read.sigmas, read.saved_modules, shared, dtype, read_from)
