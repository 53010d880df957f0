"""Model-wide adapter slot table shared by all JD-LoRA layers of one model."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..core.errors import AdapterNameError
from ..core.slots import BASE_SLOT, SlotAllocator


BASE_ADAPTER_NAME = "__base__"
# Attribute names of the container that holds each layer's Σ parameters; adapter names must not shadow them.
_SIGMA_CONTAINER = nn.ParameterDict()


def check_adapter_name(name: str) -> None:
    """Raises `AdapterNameError` for a name that the layers' `nn.ParameterDict` of Σ cannot hold.

    torch refuses keys with a dot and keys equal to a module attribute (`"double"`, `"train"`, `"to"`, …) with a bare
    `KeyError` deep inside the injection; checking first keeps the model untouched and says what to do.
    """
    if not isinstance(name, str) or not name:
        raise AdapterNameError(f"adapter name {name!r} must be a non-empty string.")
    if name == BASE_ADAPTER_NAME:
        raise AdapterNameError(f"adapter name {name!r} is reserved for base-model rows; choose another name.")
    if "." in name:
        raise AdapterNameError(
            f"adapter name {name!r} contains a dot, which torch modules cannot hold; pass e.g. "
            f"adapter_name={name.replace('.', '_')!r}."
        )
    if hasattr(_SIGMA_CONTAINER, name):
        raise AdapterNameError(
            f"adapter name {name!r} clashes with the torch module attribute {type(_SIGMA_CONTAINER).__name__}."
            f"{name}; pass another adapter_name (e.g. {name + '_adapter'!r})."
        )


def rows_per_name(num_names: int, batch: int, expansion: int = 1) -> int:
    """How many consecutive batch rows each of `num_names` adapter names covers: 1, or `expansion` when `generate`
    expanded every sequence (beam search, `num_return_sequences`).

    Raises `ValueError` for any other count, as PEFT's LoRA does: a miscounted `adapter_names` is never repeated.
    """
    if batch == num_names:
        return 1
    if expansion > 1 and batch == num_names * expansion:
        return expansion
    expanded = f" (or {num_names * expansion} after generate's {expansion}-fold expansion)" if expansion > 1 else ""
    raise ValueError(
        f"Length of `adapter_names` should be the same as the number of inputs: got {num_names} adapter_names for a "
        f"batch of {batch} sequences{expanded}; pass one name per sequence."
    )


class SlotTable(SlotAllocator):
    """The model-wide slot allocator of a JD-LoRA model, plus the per-row slots of the mixed batch being run.

    All layers of a model use the same slot for an adapter, so a batch's per-row adapter index is computed once per
    forward (not per layer).
    """

    def __init__(self, initial_capacity: int = 8):
        super().__init__(initial_capacity)
        # Set for the duration of a mixed-batch forward by `JDLoraModel._enable_peft_forward_hooks`.
        self.row_slots: Optional[torch.Tensor] = None
        # Rows per name `generate` may create (max of num_beams / num_return_sequences); 1 outside generate.
        self.row_expansion = 1
        self._token_slots_cache: dict[tuple, torch.Tensor] = {}

    def slots_for_names(self, adapter_names: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """`(len(adapter_names),)` int64 slots; `__base__` maps to slot 0. Unknown names raise `KeyError`."""
        slots = [BASE_SLOT if name == BASE_ADAPTER_NAME else self.slot_of[name] for name in adapter_names]
        return torch.tensor(slots, dtype=torch.long, device=device)

    def set_rows(self, row_slots: Optional[torch.Tensor], row_expansion: int = 1) -> None:
        """Sets the per-sequence slots of the next forward (`None` ends the mixed batch).

        Args:
            row_slots: One slot per adapter name.
            row_expansion: Rows per name that `generate` may create; a batch is then either one row per name (an
                encoder's pass) or `row_expansion` consecutive rows per name.
        """
        self.row_slots = row_slots
        self.row_expansion = max(1, int(row_expansion))
        self._token_slots_cache.clear()

    def token_slots(self, x: torch.Tensor) -> torch.Tensor:
        """Slot of every row of `x` flattened to `(tokens, features)`, from the per-sequence `row_slots`.

        Raises `ValueError` when the batch does not hold one sequence per adapter name (see `rows_per_name`).
        """
        batch = x.shape[0] if x.dim() > 1 else 1
        seq = x[0].numel() // x.shape[-1] if x.dim() > 2 else 1
        cache_key = (batch, seq, x.device)
        cached = self._token_slots_cache.get(cache_key)
        if cached is not None:
            return cached
        rows = self.row_slots.to(x.device)
        repeat = rows_per_name(rows.shape[0], batch, self.row_expansion)
        if repeat > 1:
            rows = rows.repeat_interleave(repeat)
        slots = rows.repeat_interleave(seq) if seq > 1 else rows
        self._token_slots_cache[cache_key] = slots
        return slots
