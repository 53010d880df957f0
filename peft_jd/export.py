"""Lossless export of a JD-LoRA adapter to a plain rank-r PEFT LoRA (`B' = scaling · U Σ`, `A' = Vᵀ`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from .bulk import read_sigma_adapter
from .core import ADAPTER_WEIGHTS_NAME, PEFT_KEY_PREFIX, atomic_directory, load_shared_bases, write_adapter_config
from .tuner.model import JDLoraModel


@dataclass
class LoraExport:
    """A JD-LoRA adapter rewritten as a standard PEFT LoRA.

    Args:
        config: The `LoraConfig` (rank r, `lora_alpha = r`, so PEFT's scaling is 1; the JD scaling is in `lora_B`).
        state_dict: PEFT checkpoint tensors (`base_model.model.<module>.lora_A.weight` / `lora_B.weight`).
    """

    config: LoraConfig
    state_dict: dict[str, torch.Tensor]

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Writes `adapter_config.json` + `adapter_model.safetensors`, atomically, loadable by any LoRA server."""
        with atomic_directory(save_directory) as tmp:
            save_file(
                {k: v.contiguous() for k, v in self.state_dict.items()},
                tmp / ADAPTER_WEIGHTS_NAME,
                metadata={"format": "pt"},
            )
            write_adapter_config(tmp, self.config)


def _tuner(model):
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, JDLoraModel):
        raise TypeError(f"expected a PeftModel with JD-LoRA adapters, got {type(model).__name__}.")
    return tuner


def _lora_factors(
    U: torch.Tensor, V: torch.Tensor, sigma: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(lora_A, lora_B) = (Vᵀ, scaling · U Σ)` computed in float64."""
    sigma = sigma.detach().double()
    sigma = sigma if sigma.dim() == 2 else torch.diag(sigma)
    lora_b = scaling * (U.double() @ sigma)
    return V.double().T.to("cpu", dtype).contiguous(), lora_b.to("cpu", dtype).contiguous()


def _build_export(jd_config, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> LoraExport:
    state_dict = {}
    for module_key, (lora_a, lora_b) in factors.items():
        state_dict[f"{PEFT_KEY_PREFIX}{module_key}.lora_A.weight"] = lora_a
        state_dict[f"{PEFT_KEY_PREFIX}{module_key}.lora_B.weight"] = lora_b
    config = LoraConfig(
        r=jd_config.r,
        lora_alpha=jd_config.r,
        target_modules=jd_config.target_modules,
        lora_dropout=0.0,
        bias="none",
        task_type=jd_config.task_type,
        base_model_name_or_path=jd_config.base_model_name_or_path,
        inference_mode=True,
    )
    return LoraExport(config=config, state_dict=state_dict)


def to_lora(model, adapter_name: str = "default", dtype: torch.dtype = torch.float32) -> LoraExport:
    """Exports one loaded JD-LoRA adapter as an exact rank-r PEFT LoRA.

    Args:
        model: A `PeftModel` (or `JDLoraModel`) holding the adapter.
        adapter_name: The adapter to export.
        dtype: dtype of the exported factors.

    Returns:
        A [`LoraExport`]; call `.save_pretrained(dir)` to write it.
    """
    tuner = _tuner(model)
    if adapter_name not in tuner.peft_config:
        raise KeyError(f"adapter {adapter_name!r} is not loaded; loaded: {sorted(tuner.peft_config)[:10]}")
    factors = {}
    for module_key, layer in tuner.jd_layers().items():
        if adapter_name in layer.jd_sigma:
            cluster = layer.jd_cluster[adapter_name]
            factors[module_key] = _lora_factors(
                layer.jd_U[cluster],
                layer.jd_V[cluster],
                layer.jd_sigma[adapter_name],
                layer.jd_scaling[adapter_name],
                dtype,
            )
    if not factors:
        raise ValueError(f"adapter {adapter_name!r} has no JD-LoRA layers in this model.")
    return _build_export(tuner.peft_config[adapter_name], factors)


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
    config, sigmas = read_sigma_adapter(adapter, revision, hub_kwargs, subfolder)
    shared = load_shared_bases(
        config.bases, config.bases_revision, config.bases_subfolder, config.bases_fingerprint, adapter, **hub_kwargs
    )
    factors = {}
    for module_key, sigma in sigmas.items():
        U, V = shared.module(module_key)
        cluster = config.cluster_of(module_key)
        factors[module_key] = _lora_factors(U[cluster], V[cluster], sigma, config.scaling, dtype)
    return _build_export(config, factors)
