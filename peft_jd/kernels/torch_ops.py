"""PyTorch implementation of the batched JD-LoRA update (CPU and GPU).

`y[t] += s[a] · U[c] (Σ[a] (V[c]ᵀ x[t]))` for row t of slot `a`, cluster `c`, computed with a fixed number of tensor
operations, whatever the number of adapters in the batch:

* rows are viewed as `n` blocks of `L` consecutive rows that share a slot. On CPU, `L` is the gcd of the lengths of the
  runs of equal slots (a prefill batch: one run per sequence), found once per `slot_index` tensor and cached, so the 90
  projections of one forward pay for it once; elsewhere (and in decode) `L = 1`;
* the Σ step is one batched GEMM over blocks with the blocks' Σ gathered, `(n, r, r)`; scaling multiplies `(T, r)`;
* one cluster: shrink and expand are single GEMMs, the expand accumulating into `y` in place;
* several clusters: if the blocks' bases are small next to the rows (`L ≥ r / 2`, or few rows), the blocks' `U`/`V`
  are gathered and shrink/expand are batched GEMMs; otherwise rows are sorted by cluster and each cluster present
  costs one shrink and one expand GEMM (this path reads the cluster counts on the host).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Optional, Union

import torch


__all__ = ["apply_sigma", "jd_lora_apply_torch", "row_blocks"]

# Gathering per-block bases beats sorting rows by cluster while the gathered bases are at most this many bytes.
_GATHER_BASES_MAX_BYTES = 4 << 20


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


@dataclass(frozen=True)
class RowBlocks:
    """Rows grouped in `slots.numel()` blocks of `length` consecutive rows of one slot each."""

    slots: torch.Tensor
    length: int


# (weak reference to the slot_index tensor, its version counter, its blocks): one entry, since all JD-LoRA layers of a
# forward receive the same slot tensor (`SlotTable.token_slots` caches it).
_blocks_cache: Optional[tuple[weakref.ref, int, RowBlocks]] = None


def row_blocks(slot_index: torch.Tensor) -> RowBlocks:
    """Longest blocks of equal slots that tile `slot_index` (gcd of its run lengths; 1 on non-CPU devices)."""
    global _blocks_cache
    if slot_index.device.type != "cpu" or slot_index.numel() < 2:
        return RowBlocks(slot_index, 1)
    # Inference tensors have no version counter: an in-place change could not be seen, so they are not cached.
    version = None if slot_index.is_inference() else slot_index._version
    cached = _blocks_cache
    if version is not None and cached is not None and cached[0]() is slot_index and cached[1] == version:
        return cached[2]
    _, counts = torch.unique_consecutive(slot_index, return_counts=True)
    length = math.gcd(*counts.tolist()) if counts.numel() > 1 else slot_index.numel()
    blocks = RowBlocks(slot_index[::length].contiguous() if length > 1 else slot_index, length)
    if version is not None:
        _blocks_cache = (weakref.ref(slot_index), version, blocks)
    return blocks


def _sigma_blocks(
    hidden: torch.Tensor,
    sigma_stack: torch.Tensor,
    blocks: RowBlocks,
    scaling: Union[float, torch.Tensor],
) -> torch.Tensor:
    """`s[a] Σ[a] h` for every row of `hidden` viewed as `(n, L, r)`, in Σ's dtype; returns `(n, L, r)`."""
    hidden = _cast(hidden.view(blocks.slots.numel(), blocks.length, -1), sigma_stack.dtype)
    sigma = sigma_stack.index_select(0, blocks.slots)
    out = hidden * sigma.unsqueeze(1) if sigma.dim() == 2 else torch.bmm(hidden, sigma.mT)
    if isinstance(scaling, torch.Tensor):
        out *= _cast(scaling.index_select(0, blocks.slots), out.dtype).view(-1, 1, 1)
    return out


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # `Tensor.to` costs a dispatcher round trip even when it returns `self`; this is called on the decode hot path.
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _alpha(scaling: Union[float, torch.Tensor]) -> float:
    return 1.0 if isinstance(scaling, torch.Tensor) else float(scaling)


def _accumulate(y: torch.Tensor, hidden: torch.Tensor, U: torch.Tensor, alpha: float) -> None:
    """`y += alpha · hidden Uᵀ` for `(T, r)` hidden and `(out, r)` U, in U's precision."""
    hidden = _cast(hidden, U.dtype)
    if y.dtype == U.dtype:
        y.addmm_(hidden, U.T, alpha=alpha)
    else:
        y.add_((hidden @ U.T).to(y.dtype), alpha=alpha)


def _single_cluster(y, x, U, V, sigma_stack, blocks, scaling) -> torch.Tensor:
    hidden = _sigma_blocks(x @ V[0], sigma_stack, blocks, scaling)
    _accumulate(y, hidden.view(x.shape[0], -1), U[0], _alpha(scaling))
    return y


def _gathered_bases(y, x, U, V, sigma_stack, blocks, slot_cluster, scaling) -> torch.Tensor:
    """Several clusters, each block's `U`/`V` gathered: three batched GEMMs."""
    num_blocks, length = blocks.slots.numel(), blocks.length
    block_cluster = slot_cluster.index_select(0, blocks.slots)
    hidden = torch.bmm(x.reshape(num_blocks, length, -1), V.index_select(0, block_cluster))
    hidden = _cast(_sigma_blocks(hidden, sigma_stack, blocks, scaling), U.dtype)
    U_blocks = U.index_select(0, block_cluster)
    y_blocks = y.view(num_blocks, length, -1)
    if y.dtype == U.dtype:
        y_blocks.baddbmm_(hidden, U_blocks.mT, alpha=_alpha(scaling))
    else:
        y_blocks.add_(torch.bmm(hidden, U_blocks.mT).to(y.dtype), alpha=_alpha(scaling))
    return y


def _sorted_by_cluster(y, x, U, V, sigma_stack, slot_index, slot_cluster, scaling) -> torch.Tensor:
    """Several clusters, rows sorted by cluster: one shrink and one expand GEMM per cluster present."""
    num_clusters = U.shape[0]
    row_cluster = slot_cluster.index_select(0, slot_index)
    order = torch.argsort(row_cluster, stable=True)
    counts = torch.bincount(row_cluster, minlength=num_clusters).tolist()
    x_sorted = x.index_select(0, order)
    hidden = torch.empty(x.shape[0], V.shape[2], dtype=V.dtype, device=x.device)
    bounds = []
    start = 0
    for cluster, count in enumerate(counts):
        if count:
            bounds.append((cluster, start, start + count))
            torch.mm(x_sorted[start : start + count], V[cluster], out=hidden[start : start + count])
            start += count
    hidden = _sigma_blocks(hidden, sigma_stack, RowBlocks(slot_index.index_select(0, order), 1), scaling)
    hidden = _cast(hidden.view(x.shape[0], -1), U.dtype)
    delta = torch.empty(x.shape[0], U.shape[1], dtype=U.dtype, device=y.device)
    for cluster, start, end in bounds:
        torch.mm(hidden[start:end], U[cluster].T, out=delta[start:end])
    y.index_add_(0, order, _cast(delta, y.dtype), alpha=_alpha(scaling))
    return y


def _use_gathered_bases(blocks: RowBlocks, U: torch.Tensor, V: torch.Tensor) -> bool:
    """Gathered per-block bases cost `n (in + out) r` elements; sorting rows costs `T (in + out)` plus a host loop."""
    gathered_bytes = blocks.slots.numel() * (U.shape[1] + V.shape[1]) * U.shape[2] * U.element_size()
    return 2 * blocks.length >= U.shape[2] or gathered_bytes <= _GATHER_BASES_MAX_BYTES


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
    """`y += scaling[slot] · U[c] Σ[slot] V[c]ᵀ x` for every row, with `c = slot_cluster[slot]`. See `jd_lora_apply`.

    Precision: `x` is rounded to `V`'s dtype, the Σ step runs in Σ's dtype (fp32 in the layers) and its result is
    rounded to `U`'s dtype for the expand. Rows of slot 0 (zero Σ) add zero.
    """
    if x.shape[0] == 0:
        return y
    x = _cast(x, V.dtype)
    blocks = row_blocks(slot_index)
    if U.shape[0] == 1:
        return _single_cluster(y, x, U, V, sigma_stack, blocks, scaling)
    if _use_gathered_bases(blocks, U, V):
        return _gathered_bases(y, x, U, V, sigma_stack, blocks, slot_cluster, scaling)
    return _sorted_by_cluster(y, x, U, V, sigma_stack, slot_index, slot_cluster, scaling)
