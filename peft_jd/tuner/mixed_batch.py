"""Mixed batches: `adapter_names=[…]` in `forward`/`generate` gives every sequence its own adapter."""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

import torch
from peft.utils.other import AuxiliaryTrainingWrapper

from ..core import UnknownAdapterError
from .layer import JDLoraLayer
from .slots import BASE_ADAPTER_NAME, rows_per_name


def _generation_row_expansion(kwargs: dict[str, Any], default_config: Any) -> int:
    """Rows per input sequence that `generate` will create: max(num_beams, num_return_sequences), as transformers
    expands inputs; 1 for a plain forward."""
    config = kwargs.get("generation_config") or default_config
    counts = [1]
    for name in ("num_beams", "num_return_sequences"):
        value = kwargs.get(name)
        value = getattr(config, name, None) if value is None else value
        counts.append(value if isinstance(value, int) and value > 1 else 1)
    return max(counts)


def _wrapper_names_hook(wrapper, args, kwargs, adapter_names: list[str], expansion: int):
    """Gives a `modules_to_save` wrapper one name per row of its input; adapters without their own copy of the
    module (and `__base__`) use the original module."""
    if args:
        repeat = rows_per_name(len(adapter_names), len(args[0]), expansion)
        held = wrapper._adapters
        kwargs["adapter_names"] = [
            name if name in held else BASE_ADAPTER_NAME for name in adapter_names for _ in range(repeat)
        ]
    return args, kwargs


class MixedBatchMixin:
    """Per-row adapters of a batch: one slot per sequence, shared by every JD-LoRA layer of the model."""

    def adapter_slots(self, adapter_names: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """Per-row slot tensor for `adapter_names`; raises `UnknownAdapterError` for names that are not loaded."""
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER_NAME and n not in self.slot_table})
        if unknown:
            loaded = sorted(self.slot_table.slot_of)
            shown = ", ".join(loaded[:10]) + (f", … ({len(loaded)} in all)" if len(loaded) > 10 else "")
            raise UnknownAdapterError(
                f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. Loaded adapters: {shown}. "
                f"Load them with `model.load_adapter(...)` or `peft_jd.load_adapters(...)`, or use "
                f"{BASE_ADAPTER_NAME!r} for the base model."
            )
        return self.slot_table.slots_for_names(list(adapter_names), device=device)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names must be a list of str, got {type(adapter_names).__name__}.")
        adapter_names = list(adapter_names)
        layers, wrappers = [], []
        for module in self.model.modules():
            if isinstance(module, JDLoraLayer):
                layers.append(module)
            elif isinstance(module, AuxiliaryTrainingWrapper):
                wrappers.append(module)
        if any(layer.merged for layer in layers):
            raise ValueError("Cannot pass `adapter_names` while adapters are merged; call `unmerge_adapter()` first.")
        device = layers[0].jd_U.device if layers else "cpu"
        row_slots = self.adapter_slots(adapter_names, device=device)
        expansion = _generation_row_expansion(kwargs, getattr(self.model, "generation_config", None))
        hooks = [
            module.register_forward_pre_hook(
                partial(_wrapper_names_hook, adapter_names=adapter_names, expansion=expansion), with_kwargs=True
            )
            for module in wrappers
        ]
        previous = (self.slot_table.row_slots, self.slot_table.row_expansion)
        self.slot_table.set_rows(row_slots, expansion)
        try:
            yield
        finally:
            self.slot_table.set_rows(*previous)
            for hook in hooks:
                hook.remove()
