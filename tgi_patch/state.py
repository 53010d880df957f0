"""Per-shard serving state: adapter slots, prepared layer types, the adapter-index → slot table and graph buffers.

TGI numbers adapters 1..N in load order (0 is the base model) and gives each token an adapter index
(`AdapterBatchMetadata.adapter_indices`). JD adapters get a model-wide slot from `peft_jd.core.SlotAllocator` (slot 0
is the base model's all-zero Σ, as in the PEFT tuner); `token_slots` maps a batch's adapter indices to slots with one
gather on the device (no host sync), so it also runs before a CUDA-graph replay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from peft_jd.core import AdapterFormatError, BasesMismatchError, SharedBases, SlotAllocator

from .weights import ROW, JDLayerTypeWeights, TargetLayer, build_layer_type


class JDAdapterWeights:
    """What TGI's `LayerAdapterWeights` holds for one JD adapter and layer type (TGI's `AdapterWeights` protocol)."""

    speculative_tokens = 0

    def __init__(self, state: JDServingState, layer: JDLayerTypeWeights, slot: int):
        self.state = state
        self.layer = layer
        self.slot = slot

    @classmethod
    def get_batch_types(cls) -> list[type]:
        return [JDBatchWeights]


class JDBatchWeights:
    """JD data of one layer type for one batch: the prepared weights and the per-token slots.

    Args:
        layer: The layer type's weights.
        token_slots: `(tokens,)` int64 slot of every row of the batch (0 = no JD adapter).
    """

    def __init__(self, layer: JDLayerTypeWeights, token_slots: torch.Tensor):
        self.layer = layer
        self.token_slots = token_slots

    def has_adapter(self, adapter_index: int) -> bool:
        return True

    @classmethod
    def load(cls, adapter_weights: dict[int, JDAdapterWeights], meta: Any, prefill: bool,
             prefill_head_indices: Optional[torch.Tensor]) -> Optional[JDBatchWeights]:
        """TGI's `BatchAdapterWeights.load` protocol (used when TGI's own `from_meta` buckets adapters)."""
        jd = {index: w for index, w in adapter_weights.items() if isinstance(w, JDAdapterWeights)}
        if not jd:
            return None
        first = next(iter(jd.values()))
        for index, weights in jd.items():
            first.state.bind(index, weights.slot)
        return cls(first.layer, first.state.token_slots(meta.adapter_indices))


class JDServingState:
    """Everything JD-LoRA on one shard: one bases collection, its adapters' slots and the prepared layer types."""

    def __init__(self):
        self.bases: Optional[SharedBases] = None
        self.bases_label: Optional[str] = None
        self.bases_identity: Optional[str] = None
        self.slots = SlotAllocator()
        self.unserved: dict[str, set[str]] = {}
        self.layer_types: dict[str, JDLayerTypeWeights] = {}
        self.slot_of_index: dict[int, int] = {}
        self._table: Optional[torch.Tensor] = None
        self.graph_slots: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------------- loading
    def use_bases(self, bases: SharedBases, adapter_id: str) -> None:
        """Fixes the collection on first use; a second collection is an error (one bases set per model)."""
        identity = bases.fingerprint or bases.key.describe()
        if self.bases_identity is None or self.bases_identity == identity:
            self.bases, self.bases_label, self.bases_identity = bases, bases.key.describe(), identity
            return
        if bases is not self.bases:
            raise BasesMismatchError(
                f"adapter {adapter_id!r} uses bases {bases.key.describe()}, but this server already serves bases "
                f"{self.bases_label}. One TGI server serves one JD collection; start another server for it."
            )

    def expect(self, adapter_id: str, module_keys: set[str]) -> None:
        """Records the modules an adapter adapts; `prepare` ticks them off, `check_served` reports the rest."""
        self.unserved[adapter_id] = set(module_keys)

    def check_served(self) -> None:
        """Raises if a loaded JD adapter has Σ for modules that TGI never prepared (it would be served partially)."""
        partial = {name: sorted(keys) for name, keys in self.unserved.items() if keys}
        if partial:
            name, keys = next(iter(partial.items()))
            raise AdapterFormatError(
                f"JD adapter(s) {sorted(partial)} adapt modules TGI does not apply adapters to (e.g. {name!r}: "
                f"{keys[:4]}); serving them would silently drop part of each adapter. Compress the collection for "
                "TGI's adapter layers (q/k/v/o_proj, gate/up/down_proj)."
            )

    def served_adapters(self) -> set[str]:
        """Ids of the JD adapters that hold a slot."""
        return set(self.slots.slot_of)

    def prepare(self, adapter_id: str, sigmas: dict[str, torch.Tensor], cluster_of: Callable[[str], int],
                layer_type: str, targets: list[TargetLayer], world_size: int, rank: int, dtype: torch.dtype
                ) -> Optional[JDAdapterWeights]:
        """Adds one adapter's Σ for one layer type; prepares the layer type's bases on first use.

        Args:
            adapter_id: The adapter's request id.
            sigmas: Module key → Σ (fp32, scaling folded in).
            cluster_of: Callable module key → the adapter's cluster for it.
            layer_type: TGI layer type.
            targets: The model's layers of that type, one per layer.
            world_size: Tensor-parallel world size.
            rank: This shard.
            dtype: Model dtype.

        Returns:
            The `JDAdapterWeights` to register with TGI, or `None` when the adapter does not adapt this layer type.
        """
        if not any(t.module_key in sigmas for t in targets):
            return None
        layer = self.layer_types.get(layer_type)
        if layer is None:
            layer = build_layer_type(layer_type, targets, self.bases, world_size, rank, dtype)
            self.layer_types[layer_type] = layer
        sigma = torch.zeros((len(targets), *layer.sigma_shape()), dtype=torch.float32)
        clusters = torch.zeros(len(targets), dtype=torch.long)
        for layer_id, target in enumerate(targets):
            if target.module_key in sigmas:
                # A module of lower rank (budgeted collections) fills the leading block; its bases are zero-padded.
                module_sigma = sigmas[target.module_key]
                sigma[(layer_id, *(slice(0, size) for size in module_sigma.shape))] = module_sigma
                clusters[layer_id] = cluster_of(target.module_key)
        slot = self.slots.acquire(adapter_id)
        layer.add_adapter(slot, sigma, clusters)
        self.unserved.get(adapter_id, set()).difference_update(t.module_key for t in targets)
        return JDAdapterWeights(self, layer, slot)

    def finish_loading(self) -> None:
        """Stacks every layer type's Σ and drops the CPU copy of the bases (each shard keeps its device part).

        Row-parallel helpers are allocated here too, so that nothing is cached from inside a CUDA-graph capture.
        """
        for layer in self.layer_types.values():
            layer.materialize()
            if layer.parallel == ROW:
                layer.identities()
        self.bases = None

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layer_types.values())

    # ------------------------------------------------------------------------------------------------- batches
    def bind(self, adapter_index: int, slot: int) -> None:
        """Records that TGI serves the adapter in `slot` under `adapter_index`."""
        if self.slot_of_index.get(adapter_index) != slot:
            self.slot_of_index[adapter_index] = slot
            self._table = None

    def unbind(self, adapter_index: int) -> None:
        if self.slot_of_index.pop(adapter_index, None) is not None:
            self._table = None

    def _index_table(self, device: torch.device) -> torch.Tensor:
        if self._table is None or self._table.device != device:
            size = max(self.slot_of_index, default=0) + 1
            table = torch.zeros(size, dtype=torch.long)
            for index, slot in self.slot_of_index.items():
                table[index] = slot
            self._table = table.to(device)
        return self._table

    def token_slots(self, adapter_indices: torch.Tensor) -> torch.Tensor:
        """Slot of every token from TGI's per-token adapter indices; indices of non-JD adapters map to slot 0."""
        table = self._index_table(adapter_indices.device)
        indices = adapter_indices.to(torch.long)
        inside = (indices >= 0) & (indices < table.shape[0])
        slots = table.index_select(0, indices.clamp(0, table.shape[0] - 1))
        return torch.where(inside, slots, torch.zeros_like(slots))

    def batches(self, token_slots: torch.Tensor) -> dict[str, JDBatchWeights]:
        """One `JDBatchWeights` per prepared layer type, all sharing `token_slots`."""
        return {name: JDBatchWeights(layer, token_slots) for name, layer in self.layer_types.items()}

    # --------------------------------------------------------------------------------------------- CUDA graphs
    def graph_buffer(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """The static slot buffer a CUDA graph of `batch_size` tokens reads; allocated once, zero (base) at rest."""
        buffer = self.graph_slots.get(batch_size)
        if buffer is None or buffer.device != device:
            buffer = torch.zeros(batch_size, dtype=torch.long, device=device)
            self.graph_slots[batch_size] = buffer
        return buffer

    def fill_graph_buffer(self, batch_size: int, token_slots: torch.Tensor) -> None:
        """Copies a batch's slots into the buffer of the graph that will replay it; padding rows get slot 0."""
        buffer = self.graph_slots[batch_size]
        count = token_slots.shape[0]
        if count > batch_size:
            raise ValueError(f"a batch of {count} tokens cannot replay the CUDA graph captured for {batch_size}")
        buffer[:count].copy_(token_slots)
        buffer[count:].zero_()


_STATE: Optional[JDServingState] = None


def get_state(create: bool = True) -> Optional[JDServingState]:
    """The shard's serving state (one model per TGI shard process)."""
    global _STATE
    if _STATE is None and create:
        _STATE = JDServingState()
    return _STATE


def reset_state() -> None:
    """Forgets the shard's state (tests; a shard never reloads its model)."""
    global _STATE
    _STATE = None


__all__ = ["JDAdapterWeights", "JDBatchWeights", "JDServingState", "get_state", "reset_state"]
