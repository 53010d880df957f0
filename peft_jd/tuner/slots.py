"""Model-wide adapter slot table shared by all JD-LoRA layers of one model."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..core import AdapterNameError


BASE_SLOT = 0
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


class SlotTable:
    """Maps adapter names to rows ("slots") of every layer's stacked Σ tensor.

    All layers of a model use the same slot for an adapter, so a batch's per-row adapter index is computed once per
    forward (not per layer). Slot 0 is reserved: its Σ is zero in every layer and it serves `__base__` rows.
    Freed slots are reused; capacity grows geometrically so adding adapters one by one stays amortised O(1).
    """

    def __init__(self, initial_capacity: int = 8):
        self.capacity = max(2, initial_capacity)
        self.slot_of: dict[str, int] = {}
        self._free: list[int] = []
        self._next = BASE_SLOT + 1
        # Set for the duration of a mixed-batch forward by `JDLoraModel._enable_peft_forward_hooks`.
        self.row_slots: Optional[torch.Tensor] = None
        self._token_slots_cache: dict[tuple, torch.Tensor] = {}

    def __contains__(self, adapter_name: str) -> bool:
        return adapter_name in self.slot_of

    def __len__(self) -> int:
        return len(self.slot_of)

    def acquire(self, adapter_name: str) -> int:
        """Slot of `adapter_name`, allocating one (and growing `capacity`) on first use."""
        slot = self.slot_of.get(adapter_name)
        if slot is not None:
            return slot
        if self._free:
            slot = self._free.pop()
        else:
            slot = self._next
            self._next += 1
            while slot >= self.capacity:
                self.capacity *= 2
        self.slot_of[adapter_name] = slot
        return slot

    def reserve(self, extra: int) -> None:
        """Grows `capacity` so that `extra` more adapters fit without further growth."""
        needed = len(self.slot_of) + 1 + extra - len(self._free)
        while self.capacity < max(needed, self._next):
            self.capacity *= 2

    def release(self, adapter_name: str) -> None:
        slot = self.slot_of.pop(adapter_name, None)
        if slot is not None:
            self._free.append(slot)

    def slots_for_names(self, adapter_names: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """`(len(adapter_names),)` int64 slots; `__base__` maps to slot 0. Unknown names raise `KeyError`."""
        slots = [BASE_SLOT if name == BASE_ADAPTER_NAME else self.slot_of[name] for name in adapter_names]
        return torch.tensor(slots, dtype=torch.long, device=device)

    def set_rows(self, row_slots: Optional[torch.Tensor]) -> None:
        self.row_slots = row_slots
        self._token_slots_cache.clear()

    def token_slots(self, x: torch.Tensor) -> torch.Tensor:
        """Slot of every row of `x` flattened to `(tokens, features)`, from the per-sequence `row_slots`.

        Handles inputs expanded by generation (beam search, `num_return_sequences`): the batch is then a multiple of
        the number of adapter names and each name is repeated consecutively, as `generate` expands inputs.
        """
        batch = x.shape[0] if x.dim() > 1 else 1
        seq = x[0].numel() // x.shape[-1] if x.dim() > 2 else 1
        cache_key = (batch, seq, x.device)
        cached = self._token_slots_cache.get(cache_key)
        if cached is not None:
            return cached
        rows = self.row_slots.to(x.device)
        if batch != rows.shape[0]:
            if batch % rows.shape[0]:
                raise ValueError(
                    f"got {rows.shape[0]} adapter_names for a batch of {batch} sequences; pass one name per sequence."
                )
            rows = rows.repeat_interleave(batch // rows.shape[0])
        slots = rows.repeat_interleave(seq) if seq > 1 else rows
        self._token_slots_cache[cache_key] = slots
        return slots
