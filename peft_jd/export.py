"""Lossless export of a JD-LoRA adapter to a plain rank-r PEFT LoRA (`B' = scaling · U Σ`, `A' = Vᵀ`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from .format import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_KEY_PREFIX, atomic_directory


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
            save_file({k: v.contiguous() for k, v in self.state_dict.items()}, tmp / ADAPTER_WEIGHTS_NAME,
                      metadata={"format": "pt"})
            self.config.save_pretrained(str(tmp))
            # PEFT writes target_modules from a set in arbitrary order; keep files reproducible.
            path = tmp / ADAPTER_CONFIG_NAME
            data = json.loads(path.read_text())
            if isinstance(data.get("target_modules"), list):
                data["target_modules"] = sorted(data["target_modules"])
            path.write_text(json.dumps(data, indent=2, sort_keys=True))


def _tuner(model):
    from .tuner.model import JDLoraModel

    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, JDLoraModel):
        raise TypeError(f"expected a PeftModel with JD-LoRA adapters, got {type(model).__name__}.")
    return tuner


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
    jd_config = tuner.peft_config[adapter_name]
    state_dict: dict[str, torch.Tensor] = {}
    for module_key, layer in tuner.jd_layers().items():
        if adapter_name not in layer.jd_sigma:
            continue
        cluster = layer.jd_cluster[adapter_name]
        U, V = layer.jd_U[cluster].double(), layer.jd_V[cluster].double()
        sigma = layer.jd_sigma[adapter_name].detach().double()
        sigma = sigma if sigma.dim() == 2 else torch.diag(sigma)
        lora_b = layer.jd_scaling[adapter_name] * (U @ sigma)
        prefix = f"{PEFT_KEY_PREFIX}{module_key}"
        state_dict[f"{prefix}.lora_A.weight"] = V.T.to("cpu", dtype).contiguous()
        state_dict[f"{prefix}.lora_B.weight"] = lora_b.to("cpu", dtype).contiguous()
    if not state_dict:
        raise ValueError(f"adapter {adapter_name!r} has no JD-LoRA layers in this model.")
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

