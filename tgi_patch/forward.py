"""The JD-LoRA update inside TGI's adapter layers, for eager batches and for CUDA-graph capture."""

from __future__ import annotations

from typing import Any, Optional

import torch

from peft_jd.core import ShapeMismatchError
from peft_jd.kernels import apply_sigma, jd_lora_apply

from .state import JDBatchWeights
from .weights import ROW


def jd_lora_apply_static(y: torch.Tensor, x: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                         sigma_stack: torch.Tensor, slot_index: torch.Tensor, slot_cluster: torch.Tensor
                         ) -> torch.Tensor:
    """`y[t] += U[c] Σ[a] V[c]ᵀ x[t]` (a = `slot_index[t]`, c = `slot_cluster[a]`) with no host synchronisation.

    The grouped PyTorch kernel reads the number of rows per cluster on the host, which a CUDA graph cannot capture.
    This version runs every cluster's shrink and expand on all rows and masks the rows of other clusters, so its
    shapes depend on `x` only. It costs `c` times the FLOPs of one cluster, which is small for decode batches.
    """
    sigma_rows = sigma_stack.index_select(0, slot_index)
    x = x.to(V.dtype)
    if U.shape[0] == 1:
        hidden = apply_sigma(x @ V[0], sigma_rows)
        return y.addmm_(hidden.to(y.dtype), U[0].T.to(y.dtype))
    row_cluster = slot_cluster.index_select(0, slot_index)
    for cluster in range(U.shape[0]):
        hidden = apply_sigma(x @ V[cluster], sigma_rows)
        hidden = hidden * (row_cluster == cluster).unsqueeze(-1).to(hidden.dtype)
        y.addmm_(hidden.to(y.dtype), U[cluster].T.to(y.dtype))
    return y


def _update(backend: str, graph_safe: bool, y: torch.Tensor, x: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
            sigma: torch.Tensor, slots: torch.Tensor, slot_cluster: torch.Tensor) -> torch.Tensor:
    # The Triton kernels launch from shapes only and are capturable; the PyTorch one is not with several clusters.
    if graph_safe and backend != "triton":
        return jd_lora_apply_static(y, x, U, V, sigma, slots, slot_cluster)
    return jd_lora_apply(y, x, U, V, sigma, slots, slot_cluster, backend=backend)


def apply_jd(batch: JDBatchWeights, layer_id: int, x: torch.Tensor, y: torch.Tensor,
             process_group: Optional[Any] = None, graph_safe: bool = False) -> torch.Tensor:
    """Adds the JD-LoRA update of one layer to `y` in place.

    Args:
        batch: The layer type's weights and the batch's per-token slots.
        layer_id: Index of the model layer.
        x: `(tokens, in_local)` input of the TGI layer (this shard's input slice for row-parallel layers).
        y: For column-parallel layers, this shard's `(tokens, out_local)` output slice of the layer type; for
            row-parallel layers, the full `(tokens, out_features)` output (already all-reduced by TGI).
        process_group: TGI's process group; row-parallel layers all-reduce the `(tokens, r)` shrink over it.
        graph_safe: Use only operations a CUDA graph can capture.
    """
    layer = batch.layer
    U, V, sigma, slot_cluster = layer.layer(layer_id)
    slots = batch.token_slots
    if x.shape[0] != slots.shape[0]:
        raise ValueError(
            f"{layer.layer_type} layer {layer_id}: {x.shape[0]} input rows but {slots.shape[0]} adapter slots; "
            "JD-LoRA supports layers whose rows are the batch's tokens (not lm_head)."
        )
    if x.shape[-1] != V.shape[1] or y.shape[-1] != U.shape[1]:
        raise ShapeMismatchError(
            f"{layer.layer_type} layer {layer_id}: the layer maps {x.shape[-1]} → {y.shape[-1]} features on this "
            f"shard, but its JD bases map {V.shape[1]} → {U.shape[1]}. It was compressed for another model."
        )
    backend = layer.backend
    world_size = process_group.size() if process_group is not None else 1
    if layer.parallel != ROW or world_size == 1:
        return _update(backend, graph_safe, y, x, U, V, sigma, slots, slot_cluster)
    # Row-parallel: Σ V_localᵀ x_local is a partial sum over shards (Σ is linear), so all-reduce the (tokens, r)
    # shrink, then expand with the replicated U. Identity bases/Σ let the same kernel do both halves.
    eye, ones = layer.identities()
    shrunk = torch.zeros(x.shape[0], layer.rank, dtype=torch.float32, device=x.device)
    _update(backend, graph_safe, shrunk, x, eye, V, sigma, slots, slot_cluster)
    torch.distributed.all_reduce(shrunk, group=process_group)
    return _update(backend, graph_safe, y, shrunk, U, eye, ones, slots, slot_cluster)
