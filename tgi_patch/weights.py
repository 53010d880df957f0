"""JD-LoRA weights prepared for TGI's layers: shared bases per layer type, a stacked Σ per layer, sharded for TP.

Layout, per TGI layer type (`q_proj`, `o_proj`, …) with `L` layers, `c` clusters, rank `r` and `S` adapter slots:

* `U`: `(L, c, out_local, r)` and `V`: `(L, c, in_local, r)` in the model dtype, loaded once per shard from
  `peft_jd.core.bases_store`. Column-parallel layers (q/k/v/gate/up) keep the rows of U that produce this rank's output
  slice and all of V; row-parallel layers (o/down) keep the rows of V that read this rank's input slice and all of U
  (the shrink is all-reduced). Σ is replicated.
* `sigma`: `(L, S, r, r)` (or `(L, S, r)` for diagonal Σ) in fp32 with the adapter's scaling folded in, and
  `slot_cluster`: `(L, S)`. Slot 0 is all-zero: tokens of the base model or of plain LoRA adapters.

A slot is model-wide (the same in every layer type), so a batch's per-token slot is computed once per step. The
kernel backend (`peft_jd.kernels.select_backend`) is resolved once per layer type, when its bases are placed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from peft_jd.core import BASE_SLOT, BasesNotFoundError, ShapeMismatchError, SharedBases
from peft_jd.kernels import select_backend


COLUMN = "column"
ROW = "row"

@dataclass
class TargetLayer:
    """One TGI layer that a layer type maps to, as the preparation needs it.

    Args:
        module_key: Module name in the transformers model (`model.layers.3.self_attn.q_proj`).
        parallel: `"column"` (output sharded) or `"row"` (input sharded, output all-reduced).
        out_features: Full (unsharded) output size of this sub-layer, when TGI's layer exposes it.
        in_features: Full (unsharded) input size, when TGI's layer exposes it.
        device: Where the layer's weights live.
    """

    module_key: str
    parallel: str
    out_features: Optional[int]
    in_features: Optional[int]
    device: torch.device


def shard(tensor: torch.Tensor, dim: int, world_size: int, rank: int, what: str) -> torch.Tensor:
    """Block `rank` of `world_size` equal blocks of `tensor` along `dim` (TGI's `get_start_stop_idxs_for_rank`)."""
    size = tensor.shape[dim]
    if size % world_size:
        raise ShapeMismatchError(
            f"{what}: dimension {size} cannot be split evenly over {world_size} shards; use a --num-shard that "
            "divides it."
        )
    block = size // world_size
    return tensor.narrow(dim, rank * block, block)


class JDLayerTypeWeights:
    """Bases and stacked Σ of one TGI layer type on one shard. See the module docstring for the layout.

    Args:
        layer_type: TGI's layer type name (`"q_proj"`, …).
        parallel: `"column"` or `"row"`.
        U: `(L, c, out_local, r)` output bases (this shard's part for column-parallel layers).
        V: `(L, c, in_local, r)` input bases (this shard's part for row-parallel layers).
        num_clusters: Per layer, the number of valid clusters (≤ c; layers with fewer are zero-padded).
        sigma_type: `"full"` or `"diag"`.
        backend: Kernel backend for this layer type (`"torch"` or `"triton"`); resolved from the bases' device with
            `peft_jd.kernels.select_backend` (`PEFT_JD_KERNEL`) when not given.
    """

    def __init__(self, layer_type: str, parallel: str, U: torch.Tensor, V: torch.Tensor, num_clusters: list[int],
                 sigma_type: str, backend: Optional[str] = None):
        self.layer_type = layer_type
        self.parallel = parallel
        self.U = U
        self.V = V
        self.num_clusters = num_clusters
        self.sigma_type = sigma_type
        self.rank = U.shape[-1]
        self.backend = select_backend(U.device, backend)
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sigma: Optional[torch.Tensor] = None
        self.slot_cluster: Optional[torch.Tensor] = None
        self._identity: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def num_layers(self) -> int:
        return self.U.shape[0]

    @property
    def slots(self) -> list[int]:
        return sorted(self._pending)

    def sigma_shape(self) -> tuple[int, ...]:
        return (self.rank, self.rank) if self.sigma_type == "full" else (self.rank,)

    def add_adapter(self, slot: int, sigma: torch.Tensor, clusters: torch.Tensor) -> None:
        """Registers an adapter's per-layer Σ `(L, *sigma_shape)` and clusters `(L,)` under `slot`."""
        if slot == BASE_SLOT:
            raise ValueError("slot 0 is reserved for tokens without a JD adapter")
        self._pending[slot] = (sigma.to(torch.float32), clusters.to(torch.long))
        self.sigma = None

    def remove_adapter(self, slot: int) -> None:
        self._pending.pop(slot, None)
        self.sigma = None

    def materialize(self) -> None:
        """Stacks the registered Σ into `sigma`/`slot_cluster` on the bases' device (no-op when up to date)."""
        if self.sigma is not None:
            return
        num_slots = max(self._pending, default=BASE_SLOT) + 1
        device = self.U.device
        sigma = torch.zeros((self.num_layers, num_slots, *self.sigma_shape()), dtype=torch.float32, device=device)
        slot_cluster = torch.zeros((self.num_layers, num_slots), dtype=torch.long, device=device)
        for slot, (layer_sigmas, clusters) in self._pending.items():
            sigma[:, slot] = layer_sigmas.to(device)
            slot_cluster[:, slot] = clusters.to(device)
        self.sigma, self.slot_cluster = sigma, slot_cluster

    def layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(U, V, sigma_stack, slot_cluster)` of one layer, in the shapes `peft_jd.kernels.jd_lora_apply` takes."""
        self.materialize()
        return self.U[layer_id], self.V[layer_id], self.sigma[layer_id], self.slot_cluster[layer_id]

    def identities(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(I, ones)`: `(c, r, r)` identity bases and an all-ones diagonal Σ per slot, used to split the update
        into shrink+Σ and expand around the all-reduce of row-parallel layers."""
        self.materialize()
        num_slots = self.sigma.shape[1]
        if self._identity is None or self._identity[1].shape[0] != num_slots:
            clusters = self.U.shape[1]
            eye = torch.eye(self.rank, dtype=torch.float32, device=self.U.device).expand(clusters, -1, -1).contiguous()
            self._identity = (eye, torch.ones(num_slots, self.rank, dtype=torch.float32, device=self.U.device))
        return self._identity

    def nbytes(self) -> int:
        self.materialize()
        return sum(t.nbytes for t in (self.U, self.V, self.sigma, self.slot_cluster))


def build_layer_type(layer_type: str, targets: list[TargetLayer], bases: SharedBases, world_size: int, rank: int,
                     dtype: torch.dtype) -> JDLayerTypeWeights:
    """Prepares the bases of one layer type: per layer, this shard's part of U and V, on the layer's device.

    Args:
        layer_type: TGI layer type.
        targets: One entry per model layer (`L` entries).
        bases: The shared bases of the collection.
        world_size: Number of tensor-parallel shards.
        rank: This shard.
        dtype: The model's dtype (the bases are stored in it; Σ stays fp32).
    """
    parallel = targets[0].parallel
    present = [t for t in targets if t.module_key in bases.tensors]
    if not present:
        raise BasesNotFoundError(f"bases {bases.key.describe()} cover no {layer_type} module of this model.")
    max_clusters = max(bases.tensors[t.module_key][0].shape[0] for t in present)
    r = max(bases.tensors[t.module_key][0].shape[-1] for t in present)
    shards_u, shards_v, num_clusters = [], [], []
    for target in targets:
        if target.parallel != parallel:
            raise ShapeMismatchError(f"{layer_type}: mixed column/row-parallel TGI layers are not supported.")
        if target.module_key not in bases.tensors:
            # Adapters of this collection never adapt this layer: zero bases keep the stacked layout uniform.
            ref_u, ref_v = bases.tensors[present[0].module_key]
            U = torch.zeros(max_clusters, ref_u.shape[1], r)
            V = torch.zeros(max_clusters, ref_v.shape[1], r)
            num_clusters.append(0)
        else:
            U, V = bases.tensors[target.module_key]
            _check_layer_shapes(target, U, V, bases.key.describe())
            num_clusters.append(U.shape[0])
            if U.shape[-1] < r:
                # Budgeted collections give modules their own ranks: zero columns (and the zero Σ block they meet)
                # leave the update unchanged and keep one stacked layout per layer type.
                U = torch.cat([U, U.new_zeros(*U.shape[:-1], r - U.shape[-1])], dim=-1)
                V = torch.cat([V, V.new_zeros(*V.shape[:-1], r - V.shape[-1])], dim=-1)
            if U.shape[0] < max_clusters:
                pad = max_clusters - U.shape[0]
                U = torch.cat([U, U.new_zeros(pad, *U.shape[1:])])
                V = torch.cat([V, V.new_zeros(pad, *V.shape[1:])])
        what = f"{layer_type} bases of {target.module_key}"
        if world_size > 1 and parallel == COLUMN:
            U = shard(U, 1, world_size, rank, what)
        elif world_size > 1:
            V = shard(V, 1, world_size, rank, what)
        shards_u.append(U.to(target.device, dtype))
        shards_v.append(V.to(target.device, dtype))
    return JDLayerTypeWeights(layer_type, parallel, torch.stack(shards_u).contiguous(),
                              torch.stack(shards_v).contiguous(), num_clusters, bases.config.sigma_type)


def _check_layer_shapes(target: TargetLayer, U: torch.Tensor, V: torch.Tensor, bases_label: str) -> None:
    for name, have, want in (("output", U.shape[1], target.out_features), ("input", V.shape[1], target.in_features)):
        if want is not None and have != want:
            raise ShapeMismatchError(
                f"bases {bases_label} give module {target.module_key} a {name} size of {have}, but the served model's "
                f"layer has {want}. The collection was compressed for another base model."
            )
