"""Nested bases: one module compressed at rank K, reordered so that its first k components are a rank-k solution.

Budgeted compression needs, for every module, the error at every rank it could get. Solving each module at every
rank would multiply the compression time; instead each module is solved once at its largest candidate rank K and
its components are ordered so that truncation to any k ≤ K is a good rank-k solution whose error is *exact* and
cheap:

* full Σ (orthonormal U, V): per cluster, U and V are rotated by the eigenvectors of `Σ_i w_i² Σ_i Σ_iᵀ` and
  `Σ_i w_i² Σ_iᵀ Σ_i` (the truncated-HOSVD order of the Σ stack). The optimal Σ of the truncated bases is then the
  leading `k×k` block of the rotated Σ, and `‖ΔW_i − U_k Σ_k V_kᵀ‖² = ‖ΔW_i‖² − ‖Σ_k‖²`;
* diagonal Σ: per cluster, components are sorted by weighted energy `Σ_i w_i² σ_ij² ‖u_j‖² ‖v_j‖²`; the optimal
  diagonal Σ of the first k components solves `G_k σ = b_k` with `G = (UᵀU)∘(VᵀV)` and `b_ij = u_jᵀ ΔW_i v_j`.
  With the Cholesky factor `L` of `G`, the energy kept by the first k components is the partial sum of the squares
  of `L⁻¹ b` — one triangular solve gives every k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .result import CompressionResult
from .stack import CanonicalStack
from .threads import gemm


__all__ = ["NestedModule", "nest"]

# Relative ridge added to G when it is not numerically positive definite (nearly dependent diagonal components).
_RIDGE = 1e-10


@dataclass
class NestedModule:
    """A module's solution at rank K with components in nested order.

    Args:
        U: `(c, d_out, K)` bases, nested order.
        V: `(c, d_in, K)`.
        sigma: `(n, K, K)` or `(n, K)` Σ of the rank-K solution.
        cluster: `(n,)` cluster of each adapter.
        err2: `(n, K)` fp64, squared relative error of each adapter when the module is truncated to rank `k + 1`.
        projections: `(n, K)` fp64 `b_ij = u_jᵀ ΔW_i v_j` (diagonal Σ only; the truncated Σ are refitted from them).
    """

    U: torch.Tensor
    V: torch.Tensor
    sigma: torch.Tensor
    cluster: torch.Tensor
    err2: torch.Tensor
    projections: torch.Tensor | None = None

    @property
    def max_rank(self) -> int:
        return self.U.shape[-1]

    def mean_err2(self) -> torch.Tensor:
        """`(K,)` mean over adapters of the squared relative error at ranks 1..K."""
        return self.err2.mean(0)

    def truncate(self, rank: int) -> CompressionResult:
        """The rank-`rank` solution: leading components, their optimal Σ and exact errors."""
        if not 0 < rank <= self.max_rank:
            raise ValueError(f"rank {rank} must be in [1, {self.max_rank}].")
        U, V = self.U[..., :rank].contiguous(), self.V[..., :rank].contiguous()
        if self.projections is None:
            sigma = self.sigma[:, :rank, :rank].contiguous()
        else:
            sigma = torch.zeros(self.sigma.shape[0], rank, dtype=torch.float32)
            for c in self.cluster.unique().tolist():
                idx = (self.cluster == c).nonzero().squeeze(1)
                factor = _cholesky(_gram(U[c], V[c]))
                sigma[idx] = torch.cholesky_solve(self.projections[idx, :rank].T, factor).T.float()
        return CompressionResult(U=U, V=V, sigma=sigma, cluster=self.cluster.clone(),
                                 err2=self.err2[:, rank - 1].clone())


def _gram(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    U, V = U.double(), V.double()
    return (U.T @ U) * (V.T @ V)


def _cholesky(G: torch.Tensor) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        return factor
    ridge = _RIDGE * float(G.diagonal().abs().max().clamp_min(1e-300))
    return torch.linalg.cholesky(G + ridge * torch.eye(G.shape[0], dtype=G.dtype))


def _weights2(weights: torch.Tensor | None, n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.float64) if weights is None else weights.double() ** 2


def _nest_full(result: CompressionResult, norms2: torch.Tensor, weights2: torch.Tensor) -> NestedModule:
    U, V, sigma = result.U.clone(), result.V.clone(), result.sigma.double().clone()
    for c in result.cluster.unique().tolist():
        idx = (result.cluster == c).nonzero().squeeze(1)
        S, w = sigma[idx], weights2[idx].view(-1, 1, 1)
        left = torch.linalg.eigh((w * S @ S.transpose(1, 2)).sum(0)).eigenvectors.flip(-1)
        right = torch.linalg.eigh((w * S.transpose(1, 2) @ S).sum(0)).eigenvectors.flip(-1)
        U[c] = (U[c].double() @ left).to(U.dtype)
        V[c] = (V[c].double() @ right).to(V.dtype)
        sigma[idx] = left.T @ S @ right
    # Energy of the leading k×k block for every k, from the cumulative sums of the squared entries.
    kept = (sigma**2).cumsum(1).cumsum(2).diagonal(dim1=1, dim2=2)
    err2 = _errors(result.err2, kept, norms2)
    return NestedModule(U=U, V=V, sigma=sigma.float(), cluster=result.cluster, err2=err2)


def _nest_diag(result: CompressionResult, stack: CanonicalStack, norms2: torch.Tensor,
               weights2: torch.Tensor) -> NestedModule:
    U, V, sigma = result.U.clone(), result.V.clone(), result.sigma.clone()
    n, K = sigma.shape
    projections = torch.zeros(n, K, dtype=torch.float64)
    kept = torch.zeros(n, K, dtype=torch.float64)
    for c in result.cluster.unique().tolist():
        idx = (result.cluster == c).nonzero().squeeze(1)
        column_norms2 = (U[c].double() ** 2).sum(0) * (V[c].double() ** 2).sum(0)
        energy = (weights2[idx].unsqueeze(1) * sigma[idx].double() ** 2).sum(0) * column_norms2
        order = energy.argsort(descending=True)
        U[c], V[c] = U[c][:, order], V[c][:, order]
        sigma[idx] = sigma[idx][:, order]
        sub = stack.select(idx)
        left = gemm(sub.flat_lt(), U[c].float()).reshape(sub.n, sub.r, K).double()
        right = gemm(sub.flat_rt(), V[c].float()).reshape(sub.n, sub.r, K).double() * sub.s.unsqueeze(-1)
        b = (left * right).sum(1)
        projections[idx] = b
        whitened = torch.linalg.solve_triangular(_cholesky(_gram(U[c], V[c])), b.T, upper=False).T
        kept[idx] = (whitened**2).cumsum(1)
    err2 = _errors(None, kept, norms2)
    return NestedModule(U=U, V=V, sigma=sigma, cluster=result.cluster, err2=err2, projections=projections)


def _errors(err2_at_max: torch.Tensor | None, kept: torch.Tensor, norms2: torch.Tensor) -> torch.Tensor:
    """`(n, K)` squared relative errors from the energy kept at each rank; anchored to the solver's exact error at
    rank K when given (so that the two agree to the last digit)."""
    safe = norms2.clamp_min(1e-300).unsqueeze(1)
    if err2_at_max is not None:
        err2 = err2_at_max.double().unsqueeze(1) + (kept[:, -1:] - kept) / safe
    else:
        err2 = 1 - kept / safe
    return torch.where(norms2.unsqueeze(1) > 0, err2.clamp(0, 1), torch.zeros_like(err2))


def nest(result: CompressionResult, stack: CanonicalStack, diagonal: bool,
         weights: torch.Tensor | None = None) -> NestedModule:
    """Reorders a module's rank-K solution into nested components (see the module docstring).

    Args:
        result: `compress_stack`'s result at rank K (per-cluster bases, `cluster` and `err2` set).
        stack: The module's updates (diagonal Σ needs them once, for `b`).
        diagonal: Whether Σ is diagonal (`jd-diag`).
        weights: Per-adapter weights of the objective (`1/‖ΔW_i‖` when normalised), used to order components.
    """
    norms2 = stack.norms2()
    weights2 = _weights2(weights, stack.n)
    if diagonal:
        return _nest_diag(result, stack, norms2, weights2)
    return _nest_full(result, norms2, weights2)
