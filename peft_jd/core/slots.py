"""Adapter slots: the row of every layer's stacked Σ that an adapter occupies, shared by all layers of a model.

Slot 0 is reserved for rows without adapter (its Σ is zero everywhere). Freed slots are reused; `capacity` grows
geometrically so adding adapters one by one stays amortised O(1). Used by the PEFT tuner and both serving engines.
"""

from __future__ import annotations


BASE_SLOT = 0


class SlotAllocator:
    """Maps adapter names to slots.

    Args:
        initial_capacity: Rows the Σ stacks start with (slot 0 included).
    """

    def __init__(self, initial_capacity: int = 8):
        self.capacity = max(2, initial_capacity)
        self.slot_of: dict[str, int] = {}
        self._free: list[int] = []
        self._next = BASE_SLOT + 1

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
        """Frees the slot of `adapter_name` (if any) for reuse."""
        slot = self.slot_of.pop(adapter_name, None)
        if slot is not None:
            self._free.append(slot)
