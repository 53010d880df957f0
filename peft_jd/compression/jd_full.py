"""JD-Full: shared orthonormal `U (d_out×k)`, `V (d_in×k)` and a dense `Σ_i = Uᵀ ΔW_i V` per adapter.

Maximises `f(U, V) = Σ_i w_i² ‖Uᵀ ΔW_i V‖²_F` by block-coordinate ascent. Each half step is a Rayleigh–Ritz step of
`M_U = Σ_i w_i² ΔW_i V Vᵀ ΔW_iᵀ` on the `2k`-dimensional space `span[U, M_U U]`: it contains the current `U`, so `f`
never decreases, and it converges much faster than one power step per alternation. Every product is taken on the
canonical stack (`L_iᵀ U`, `R_iᵀ V`, `Σ_i L_i X_i`): skinny GEMMs, never a `d×d` matrix or a dense `ΔW_i`.
"""

from __future__ import annotations

import torch

from .result import CompressionResult
from .stack import CanonicalStack
from .threads import few_threads, gemm


def orthonormal_complement(M: torch.Tensor, X: torch.Tensor | None, rel_tol: float = 1e-9) -> torch.Tensor:
    """Orthonormal basis (fp64) of the part of `span(M)` orthogonal to the orthonormal `X`; may have 0 columns.

    Directions below `rel_tol` times the norm of `M` (before projection) are rounding noise and are dropped: keeping
    them would break the orthogonality to `X` when `span(M) ⊂ span(X)`.
    """
    M = M.double()
    scale = float(torch.linalg.matrix_norm(M)) if M.numel() else 0.0
    if X is not None and X.shape[1]:
        for _ in range(2):  # twice is enough (Kahan–Parlett)
            M = M - X @ (X.T @ M)
    if M.shape[1] == 0 or scale == 0:
        return M[:, :0]
    basis, svals, _ = torch.linalg.svd(M, full_matrices=False)
    return basis[:, svals > rel_tol * scale]


def _top_eigvecs(H: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    evals, evecs = torch.linalg.eigh(H)
    return evals.flip(0)[:k], evecs.flip(1)[:, :k]


def rayleigh_ritz(basis: torch.Tensor, proj: torch.Tensor, other: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best `k`-dim subspace for one side inside `span(basis)`, given the other side's weighted projections.

    Args:
        basis: `(d, m)` orthonormal, fp64.
        proj: `(n, r, m)` fp32, the stacked singular vectors of the side being updated (`L_iᵀ` or `R_iᵀ`) times
            `basis`.
        other: `(n, r, k)` fp32, the other side's projections times `w_i σ_i` (e.g. `w_i S_i R_iᵀ V`).
        k: Number of columns to keep.

    Returns:
        The new `(d, k)` basis (fp64), its projections `(n, r, k)` (fp32), and the captured weighted energy.
    """
    # Y_i = basisᵀ ΔW_i V (weighted) is (m, k); H = Σ_i Y_i Y_iᵀ.
    Y = proj.transpose(1, 2).double() @ other.double()
    H = torch.einsum("nak,nbk->ab", Y, Y)
    evals, E = _top_eigvecs(H, k)
    return basis @ E, (proj.double() @ E).float(), float(evals.clamp_min(0).sum())


def expand_and_rotate(flat_x: torch.Tensor, X: torch.Tensor, proj: torch.Tensor, other: torch.Tensor, k: int,
                      previous: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One monotone half step: Rayleigh–Ritz on `span[X, M X, previous]` with `M X = Σ_i x_i other_i Σ_iᵀ`.

    Adding the previous basis (LOBPCG-style momentum) costs a wider GEMM but cuts the number of alternations.
    """
    n, r, _ = proj.shape
    sigma = proj.transpose(1, 2) @ other  # (n, k, k): Xᵀ ΔW_i Y (weighted)
    MX = gemm(flat_x.T, (other @ sigma.transpose(1, 2)).reshape(n * r, -1))
    extra = MX if previous is None else torch.cat([previous.double(), MX.double()], dim=1)
    Z = orthonormal_complement(extra, X)
    if Z.shape[1]:
        proj = torch.cat([proj, gemm(flat_x, Z.float()).reshape(n, r, -1)], dim=2)
        X = torch.cat([X, Z], dim=1)
    return rayleigh_ritz(X, proj, other, k)


def random_range(flat_x: torch.Tensor, weighted_s: torch.Tensor, other: torch.Tensor | None, width: int,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Orthonormal `(d, width)` sample of the range of `[x_i W_i]` (randomized range finder; one GEMM).

    `W_i` is `w_i S_i` (one-sided, `other=None`) or `w_i S_i (other side)ᵀ` (given the other side's projections).
    """
    n, r = weighted_s.shape
    if other is None:
        mix = torch.randn(n, r, width, generator=generator, dtype=torch.float64, device=weighted_s.device)
    else:
        gauss = torch.randn(n, other.shape[2], width, generator=generator, dtype=torch.float64,
                            device=weighted_s.device)
        mix = other.double() @ gauss
    mix = (mix * weighted_s.unsqueeze(-1)).float().reshape(n * r, width)
    return orthonormal_complement(gemm(flat_x.T, mix), None)


def pad_basis(X: torch.Tensor, d: int, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Completes an orthonormal basis with < k columns to k columns (random directions)."""
    while X.shape[1] < k:
        extra = torch.randn(d, k - X.shape[1], generator=generator, dtype=torch.float64, device=X.device)
        X = torch.cat([X, orthonormal_complement(extra, X)], dim=1)
    return X


def initial_bases(stack: CanonicalStack, k: int, weighted_s: torch.Tensor,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """HOSVD-like start: `V` ≈ top-k of `Σ w²ΔWᵀΔW` (range finder + Rayleigh–Ritz), then `U` likewise given `V`."""
    flat_l, flat_r = stack.flat_lt(), stack.flat_rt()
    V = random_range(flat_r, weighted_s, None, min(2 * k, stack.d_in), generator)
    V = pad_basis(V, stack.d_in, k, generator)
    # One-sided energy Σ_i ‖Vᵀ R_i S_i‖²: the "other side" is the diagonal w_i S_i.
    V, P, _ = _best_of(flat_r, V, torch.diag_embed(weighted_s).float(), k)
    U = random_range(flat_l, weighted_s, P, min(2 * k, stack.d_out), generator)
    U = pad_basis(U, stack.d_out, k, generator)
    return _best_of(flat_l, U, P * weighted_s.unsqueeze(-1).float(), k)[0], V


def _best_of(flat_x: torch.Tensor, X: torch.Tensor, other: torch.Tensor,
             k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    proj = gemm(flat_x, X.float()).reshape(other.shape[0], other.shape[1], -1)
    return rayleigh_ritz(X, proj, other, k)


def full_sigmas(stack: CanonicalStack, Q: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """`Σ_i = Uᵀ ΔW_i V = (L_iᵀU)ᵀ S_i (R_iᵀV)` for all adapters, `(n, k, k)` fp64."""
    return Q.transpose(1, 2).double() @ (P.double() * stack.s.unsqueeze(-1))


@few_threads()
def jd_full(
    stack: CanonicalStack,
    k: int,
    weights: torch.Tensor | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    tol: float = 1e-3,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
    momentum: bool = True,
) -> CompressionResult:
    """Joint diagonalisation with full `Σ_i` of one module's stack.

    Args:
        stack: The canonical stack of the adapters.
        k: Rank of the shared bases (`≤ min(d_out, d_in)`).
        weights: Per-adapter weights `w_i` (e.g. `1/‖ΔW_i‖` for Frobenius normalisation); `None` means 1.
        init: Starting `(U, V)`; orthonormalised here. `None`: HOSVD-like start.
        tol: Stop when one alternation changes the weighted relative error `e` by less than `tol · min(e, 1 − e)`.
        max_iter: Maximum number of alternations.
        generator: Random generator of the initialisation (determinism).
    """
    if not 0 < k <= min(stack.d_out, stack.d_in):
        raise ValueError(f"rank {k} must be in [1, min(d_out={stack.d_out}, d_in={stack.d_in})].")
    weights = torch.ones(stack.n, dtype=torch.float64) if weights is None else weights.double()
    weighted_s = stack.s * weights.unsqueeze(1)
    total = float((weighted_s**2).sum())
    flat_l, flat_r = stack.flat_lt(), stack.flat_rt()
    if init is None:
        U, V = initial_bases(stack, k, weighted_s, generator)
    else:
        U = pad_basis(orthonormal_complement(init[0], None)[:, :k], stack.d_out, k, generator)
        V = pad_basis(orthonormal_complement(init[1], None)[:, :k], stack.d_in, k, generator)
    ws = weighted_s.unsqueeze(-1).float()
    Q = gemm(flat_l, U.float()).reshape(stack.n, stack.r, k)
    P = gemm(flat_r, V.float()).reshape(stack.n, stack.r, k)
    captured = float((full_sigmas(stack, Q, P * weights.view(-1, 1, 1).float()) ** 2).sum())
    result = CompressionResult(U=U, V=V, sigma=torch.empty(0), captured=torch.empty(0))
    result.history.append(_relative_error(captured, total))
    U_old = V_old = None
    for iteration in range(1, max_iter + 1):
        U_new, Q, _ = expand_and_rotate(flat_l, U, Q, P * ws, k, U_old if momentum else None)
        V_new, P, captured = expand_and_rotate(flat_r, V, P, Q * ws, k, V_old if momentum else None)
        U_old, V_old, U, V = U, V, U_new, V_new
        result.iterations = iteration
        result.history.append(_relative_error(captured, total))
        if converged(result.history, tol):
            result.converged = True
            break
    sigma = full_sigmas(stack, Q, P)
    result.U, result.V = U.float(), V.float()
    result.sigma, result.captured = sigma.float(), (sigma**2).sum((1, 2))
    return result


def converged(history: list[float], tol: float) -> bool:
    """The last iteration changed the relative error `e` by at most `tol · min(e, 1 − e)`: a relative change below
    `tol` of the error when it is small, and of the captured energy when the error is close to 1 (e.g. one basis for
    a thousand unrelated adapters, where the error moves little but the kept energy still grows)."""
    error = history[-1]
    return history[-2] - error <= tol * min(error, 1 - error)


def _relative_error(captured: float, total: float) -> float:
    return max(0.0, 1.0 - captured / total) if total > 0 else 0.0
