"""PyTorch implementation of the batched JD-LoRA update (CPU and GPU)."""

from __future__ import annotations

from typing import Union

import torch


def apply_sigma(hidden: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Applies a per-row Σ to the shrunk activations, in the precision of `sigma` (fp32 accumulation).

    Args:
        hidden: `(T, r)` rows of `x V`.
        sigma: `(T, r, r)` (full) or `(T, r)` (diag) per-row Σ.
    """
    hidden = hidden.to(sigma.dtype)
    if sigma.dim() == 2:
        return hidden * sigma
    return torch.bmm(sigma, hidden.unsqueeze(-1)).squeeze(-1)


def jd_lora_apply_torch(
    y: torch.Tensor,
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    sigma_stack: torch.Tensor,
    slot_index: torch.Tensor,
    slot_cluster: torch.Tensor,
    scaling: Union[float, torch.Tensor] = 1.0,
) -> torch.Tensor:
    """`y += scaling[slot] · U[c] Σ[slot] V[c]ᵀ x` for every row, with `c = slot_cluster[slot]`. See `jd_lora_apply`."""
    num_clusters = U.shape[0]
    sigma_rows = sigma_stack.index_select(0, slot_index)
    if isinstance(scaling, torch.Tensor):
        sigma_rows = sigma_rows * scaling.index_select(0, slot_index).view(-1, *([1] * (sigma_rows.dim() - 1)))
        scaling = 1.0
    x = x.to(V.dtype)
    if num_clusters == 1:
        hidden = apply_sigma(x @ V[0], sigma_rows).to(U.dtype)
        y.addmm_(hidden.to(y.dtype), U[0].T.to(y.dtype), alpha=scaling)
        return y
    # Rows are grouped by cluster so that each cluster costs one shrink GEMM and one expand GEMM; the Python loop runs
    # over clusters present in the batch (at most `num_clusters`), never over adapters.
    row_cluster = slot_cluster.index_select(0, slot_index)
    order = torch.argsort(row_cluster, stable=True)
    counts = torch.bincount(row_cluster, minlength=num_clusters).tolist()
    x_sorted = x.index_select(0, order)
    sigma_sorted = sigma_rows.index_select(0, order)
    delta = torch.empty(x.shape[0], U.shape[1], dtype=y.dtype, device=y.device)
    start = 0
    for cluster, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        hidden = apply_sigma(x_sorted[rows] @ V[cluster], sigma_sorted[rows]).to(U.dtype)
        delta[rows] = hidden @ U[cluster].T
        start += count
    y.index_add_(0, order, delta, alpha=scaling)
    return y
