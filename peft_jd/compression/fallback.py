"""Outlier fallback: adapters the shared bases serve badly keep their own factors, as a private cluster.

A module's bases already come in clusters, and every adapter picks one cluster per module; an adapter whose error on
the shared clusters is above `fallback_error` for a module gets one more cluster of that module that only it uses:
`U = L[:, :k]`, `V = R[:, :k]`, `Σ = diag(s[:k])` from its own thin SVD (exact when its LoRA rank is at most the
module's rank k). It stays in the same collection, the same file format and the same mixed batch — the kernels treat
a private cluster like any other — and its bytes are the bases bytes of that cluster, counted in `report.json`.
"""

from __future__ import annotations

import torch

from .result import CompressionResult
from .stack import CanonicalStack


__all__ = ["add_private_clusters", "fallback_pairs"]


def fallback_pairs(err2: torch.Tensor, fallback_error: float | None) -> torch.Tensor:
    """Indices of the adapters whose err² on the shared clusters exceeds `fallback_error` (none when unset)."""
    if fallback_error is None:
        return torch.zeros(0, dtype=torch.long)
    return (err2 > fallback_error).nonzero().squeeze(1)


def private_cluster_errors(stack: CanonicalStack, rank: int) -> torch.Tensor:
    """`(n,)` err² of every adapter if it kept its own top-`rank` factors (0 when its LoRA rank is ≤ `rank`)."""
    norms2 = stack.norms2()
    tail = (stack.s[:, rank:] ** 2).sum(1)
    return torch.where(norms2 > 0, tail / norms2.clamp_min(1e-300), torch.zeros_like(norms2))


def add_private_clusters(result: CompressionResult, stack: CanonicalStack,
                         adapters: torch.Tensor) -> CompressionResult:
    """Gives each adapter in `adapters` its own cluster holding its top-k factors (k = the module's rank).

    Args:
        result: The module's solution (`U (c, d_out, k)`, `V`, `sigma`, `cluster`, `err2`).
        stack: The module's updates, in the same adapter order.
        adapters: Indices of the adapters to move to private clusters.
    """
    if adapters.numel() == 0:
        return result
    c, _, k = result.U.shape
    keep = min(k, stack.r)
    p = adapters.numel()
    U_private = torch.zeros(p, stack.d_out, k, dtype=result.U.dtype)
    V_private = torch.zeros(p, stack.d_in, k, dtype=result.V.dtype)
    U_private[:, :, :keep] = stack.lt[adapters, :keep].transpose(1, 2).to(result.U.dtype)
    V_private[:, :, :keep] = stack.rt[adapters, :keep].transpose(1, 2).to(result.V.dtype)
    singular = torch.zeros(p, k, dtype=torch.float32)
    singular[:, :keep] = stack.s[adapters, :keep].float()
    sigma = result.sigma.clone()
    sigma[adapters] = torch.diag_embed(singular) if sigma.dim() == 3 else singular
    cluster = result.cluster.clone()
    cluster[adapters] = torch.arange(c, c + p, dtype=cluster.dtype)
    err2 = result.err2.clone()
    err2[adapters] = private_cluster_errors(stack.select(adapters), k).to(err2.dtype)
    return CompressionResult(U=torch.cat([result.U, U_private]), V=torch.cat([result.V, V_private]), sigma=sigma,
                             cluster=cluster, err2=err2, history=result.history, iterations=result.iterations,
                             rounds=result.rounds, converged=result.converged, seconds=result.seconds)
