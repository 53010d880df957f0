"""Sigma adapters as the tuner receives them: read from files (`SigmaAdapter`) or as a PEFT checkpoint state dict."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..core import PEFT_KEY_PREFIX, AdapterSpec, split_adapter_keys


@dataclass
class SigmaAdapter:
    """One sigma adapter, read from its files, ready for `JDLoraModel.load_sigma_adapters`.

    Args:
        name: Name to register the adapter under.
        spec: Its parsed config (relative `bases` resolved).
        sigmas: Σ by module key.
        saved_modules: Tensors of its `modules_to_save`, by checkpoint key (as PEFT writes them, e.g.
            `base_model.model.score.weight`).
    """

    name: str
    spec: AdapterSpec
    sigmas: dict[str, torch.Tensor]
    saved_modules: dict[str, torch.Tensor] = field(default_factory=dict)


def split_checkpoint(
    spec: AdapterSpec, state_dict: Mapping[str, torch.Tensor], where: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`(Σ by module key, modules_to_save tensors by key)` of a PEFT checkpoint state dict of a sigma adapter.

    Keys without PEFT's `base_model.model.` prefix (adapters injected without a `PeftModel`) get it, so that the
    core's one key rule (`split_adapter_keys`) applies. Raises `AdapterFormatError` for a tensor that is neither.
    """
    prefixed = {key if key.startswith(PEFT_KEY_PREFIX) else PEFT_KEY_PREFIX + key: key for key in state_dict}
    sigma_keys, saved_keys = split_adapter_keys(list(prefixed), spec, where)
    sigmas = {module: state_dict[prefixed[key]] for module, key in sigma_keys.items()}
    return sigmas, {prefixed[key]: state_dict[prefixed[key]] for key in saved_keys}
