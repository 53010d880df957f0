"""Compression of one module's stack of LoRA updates: `svd`, `jd-full`, `jd-diag`, with or without clusters.

Pure torch on factor stacks (see `stack.py`); the joint methods never form a dense `ΔW_i` or a `d×d` matrix.
"""

from __future__ import annotations

import time
import zlib

import torch

from ..core import UsageError
from .clustering import captured_energy, cluster_compress
from .jd_diag import _solve, jd_diag
from .jd_full import jd_full
from .result import CompressionResult
from .stack import CanonicalStack
from .threads import few_threads, gemm


METHODS = ("jd-full", "jd-diag", "svd")
# Below this relative error the cheap estimate `1 − captured/‖ΔW‖²` is dominated by fp32 rounding; recompute in fp64.
_ACCURATE_BELOW = 1e-3
_CHUNK = 64


def sigma_type_of(method: str) -> str:
    """`"full"` for JD-Full, `"diag"` for JD-Diag and the SVD baseline (its Σ are singular values)."""
    check_method(method)
    return "full" if method == "jd-full" else "diag"


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UsageError(f"unknown compression method {method!r}; choose one of {', '.join(METHODS)}.")


def module_generator(seed: int, module_key: str) -> torch.Generator:
    """Per-module random generator: results do not depend on which modules ran before (resume, probes)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(module_key.encode())) % (2**63))


def normalization_weights(stack: CanonicalStack, normalize: bool) -> torch.Tensor:
    """`1/‖ΔW_i‖_F` (0 for an all-zero update) if `normalize`, else ones."""
    if not normalize:
        return torch.ones(stack.n, dtype=torch.float64)
    norms = stack.norms2().sqrt()
    return torch.where(norms > 0, 1 / norms.clamp_min(1e-300), 0.0)


def truncated_svd(stack: CanonicalStack, k: int) -> CompressionResult:
    """Per-adapter truncated SVD (no sharing): adapter `i` is its own cluster `i`, Σ its top-k singular values."""
    keep = min(k, stack.r)
    U = torch.zeros(stack.n, stack.d_out, k)
    V = torch.zeros(stack.n, stack.d_in, k)
    U[:, :, :keep] = stack.lt[:, :keep].transpose(1, 2)
    V[:, :, :keep] = stack.rt[:, :keep].transpose(1, 2)
    sigma = torch.zeros(stack.n, k)
    sigma[:, :keep] = stack.s[:, :keep].float()
    norms2 = stack.norms2()
    tail = (stack.s[:, keep:] ** 2).sum(1)
    err2 = torch.where(norms2 > 0, tail / norms2.clamp_min(1e-300), 0.0)
    return CompressionResult(U=U, V=V, sigma=sigma, cluster=torch.arange(stack.n), err2=err2)


def relative_errors(stack: CanonicalStack, U: torch.Tensor, V: torch.Tensor, sigma: torch.Tensor,
                    cluster: torch.Tensor, captured: torch.Tensor | None = None) -> torch.Tensor:
    """Squared relative errors of `ΔŴ_i = U[c_i] Σ_i V[c_i]ᵀ`, accurate to fp64 where they are small.

    Args:
        stack: The adapters.
        U: `(c, d_out, k)`.
        V: `(c, d_in, k)`.
        sigma: `(n, k, k)` or `(n, k)`.
        cluster: `(n,)`.
        captured: Optional cheap estimate of the kept energy; only adapters whose estimated error is below 1e-3 are
            recomputed (in fp64, `‖ΔW‖² − 2⟨ΔW, ΔŴ⟩ + ‖ΔŴ‖²` from `k×k` and `r×k` products).
    """
    norms2 = stack.norms2()
    if captured is None:
        err2 = torch.zeros(stack.n, dtype=torch.float64)
        todo = torch.arange(stack.n)
    else:
        err2 = torch.where(norms2 > 0, (1 - captured / norms2.clamp_min(1e-300)).clamp_min(0), 0.0)
        todo = ((err2 < _ACCURATE_BELOW) & (norms2 > 0)).nonzero().squeeze(1)
    full_sigma = sigma if sigma.dim() == 3 else torch.diag_embed(sigma)
    grams_u = U.double().transpose(1, 2) @ U.double()
    grams_v = V.double().transpose(1, 2) @ V.double()
    for start in range(0, todo.numel(), _CHUNK):
        idx = todo[start : start + _CHUNK]
        c = cluster[idx]
        LX = stack.lt[idx].double() @ U[c].double()  # (m, r, k)
        RY = stack.rt[idx].double() @ V[c].double()
        S = full_sigma[idx].double()
        cross = ((LX @ S) * RY).sum(2).mul(stack.s[idx]).sum(1)
        hat2 = (S.transpose(1, 2) @ grams_u[c] @ S * grams_v[c]).sum((1, 2))
        # ‖ΔW‖² of the stored fp32 singular vectors (orthonormal only to fp32 precision), consistent with `cross`.
        lt, rt, s = stack.lt[idx].double(), stack.rt[idx].double(), stack.s[idx]
        weighted = s.unsqueeze(2) * s.unsqueeze(1)
        exact2 = (weighted * (lt @ lt.transpose(1, 2)) * (rt @ rt.transpose(1, 2))).sum((1, 2))
        residual = (exact2 - 2 * cross + hat2).clamp_min(0)
        err2[idx] = torch.where(exact2 > 0, residual / exact2.clamp_min(1e-300), 0.0)
    return err2


@few_threads()
def compress_stack(
    stack: CanonicalStack,
    method: str,
    rank: int,
    clusters: int = 1,
    normalize: bool = True,
    tol: float = 1e-3,
    max_iter: int = 100,
    max_rounds: int = 3,
    generator: torch.Generator | None = None,
) -> CompressionResult:
    """Compresses one module.

    Args:
        stack: Canonical stack of the module's LoRA updates.
        method: `"jd-full"`, `"jd-diag"` or `"svd"`.
        rank: Rank `k` of the bases (`≤ min(d_out, d_in)`).
        clusters: Number of clusters (ignored by `svd`, whose every adapter is its own cluster).
        normalize: Weight each update by `1/‖ΔW_i‖_F` in the joint objective, so it minimises the mean relative error.
        tol: Convergence tolerance (relative decrease of the error per iteration).
        max_iter: Maximum iterations per solve.
        max_rounds: Maximum reassignment rounds with clusters.
        generator: Random generator (seeding, initialisation).
    """
    check_method(method)
    if not 0 < rank <= min(stack.d_out, stack.d_in):
        raise ValueError(f"rank {rank} must be in [1, min(d_out={stack.d_out}, d_in={stack.d_in})].")
    start = time.perf_counter()
    if method == "svd":
        result = truncated_svd(stack, rank)
        result.seconds = time.perf_counter() - start
        return result
    weights = normalization_weights(stack, normalize)
    solver = jd_full if method == "jd-full" else jd_diag
    if clusters <= 1 or stack.n == 1:
        solution = solver(stack, rank, weights=weights, tol=tol, max_iter=max_iter, generator=generator)
        U, V, sigma = solution.U.unsqueeze(0), solution.V.unsqueeze(0), solution.sigma
        cluster, captured = torch.zeros(stack.n, dtype=torch.long), solution.captured
        iterations, rounds, history = solution.iterations, 0, solution.history
    else:
        solution = cluster_compress(stack, rank, clusters, solver, diagonal=method == "jd-diag", weights=weights,
                                    tol=tol, max_iter=max_iter, max_rounds=max_rounds, generator=generator)
        U, V, sigma, cluster, captured = solution.U, solution.V, solution.sigma, solution.cluster, solution.captured
        iterations, rounds, history = solution.iterations, solution.rounds, solution.history
    err2 = relative_errors(stack, U, V, sigma, cluster, captured)
    return CompressionResult(U=U, V=V, sigma=sigma, cluster=cluster, err2=err2, iterations=iterations, rounds=rounds,
                        history=history, seconds=time.perf_counter() - start)


@few_threads()
def project_stack(stack: CanonicalStack, U: torch.Tensor, V: torch.Tensor, diagonal: bool,
                  orthonormal: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projects new updates onto existing bases: best cluster, optimal Σ and error per adapter.

    Args:
        stack: The new adapters.
        U: `(c, d_out, k)` existing bases (orthonormal for full Σ).
        V: `(c, d_in, k)`.
        diagonal: Fit diagonal Σ by least squares instead of `Σ = Uᵀ ΔW V`.
        orthonormal: Whether U and V have orthonormal columns (JD-Full); otherwise (calibrated collections, whose V
            is whitened) full Σ is the least-squares `(UᵀU)⁺ Uᵀ ΔW V (VᵀV)⁺`.

    Returns:
        `(cluster (n,), sigma (n, k, k) or (n, k), err2 (n,))`.
    """
    energy = captured_energy(stack, U, V, diagonal)
    cluster = energy.argmax(1)
    k = U.shape[2]
    sigma = torch.zeros((stack.n, k) if diagonal else (stack.n, k, k), dtype=torch.float64)
    for c in cluster.unique().tolist():
        idx = (cluster == c).nonzero().squeeze(1)
        sub = stack.select(idx)
        Q = gemm(sub.flat_lt(), U[c].float()).reshape(sub.n, sub.r, k).double()
        P = gemm(sub.flat_rt(), V[c].float()).reshape(sub.n, sub.r, k).double() * sub.s.unsqueeze(-1)
        if diagonal:
            Uc, Vc = U[c].double(), V[c].double()
            sigma[idx] = _solve((Uc.T @ Uc) * (Vc.T @ Vc), (Q * P).sum(1))
        elif orthonormal:
            sigma[idx] = Q.transpose(1, 2) @ P
        else:
            Uc, Vc = U[c].double(), V[c].double()
            sigma[idx] = torch.linalg.pinv(Uc.T @ Uc) @ (Q.transpose(1, 2) @ P) @ torch.linalg.pinv(Vc.T @ Vc)
    sigma = sigma.float()
    # The cheap estimate assumes orthonormal bases for full Σ; otherwise every error is computed exactly.
    captured = energy.gather(1, cluster.unsqueeze(1)).squeeze(1) if orthonormal or diagonal else None
    return cluster, sigma, relative_errors(stack, U, V, sigma, cluster, captured)
