"""JD-Diag: shared (not orthonormal) `U`, `V` and a diagonal `Σ_i = diag(σ_i)` per adapter.

This is a rank-`k` CP decomposition of the `d_out × d_in × n` tensor of updates, fitted by alternating least squares
(each step is an exact least-squares solve, so the weighted residual never increases):

* `σ_i` solves `((UᵀU) ⊙ (VᵀV)) σ_i = diag(Uᵀ ΔW_i V)`;
* `U ← (Σ_i ΔW_i V D_i)((VᵀV) ⊙ Σ_i σ_i σ_iᵀ)⁻¹`, and `V` likewise.

ALS is slow from a cold start, so by default it starts from a CP fit of the small Tucker core of a rank-`2k`
JD-Full solution (cheap: `2k × 2k × n`), lifted back to full size, and then refines in full size.
"""

from __future__ import annotations

import torch

from .jd_full import converged, jd_full
from .result import CompressionResult
from .stack import CanonicalStack, canonicalize
from .threads import few_threads, gemm


_RIDGE = 1e-12


def _solve(G: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """`rhs G⁻¹` for a symmetric PSD `G` (tiny ridge keeps unused components at zero instead of failing)."""
    ridge = _RIDGE * float(G.diagonal().sum().clamp_min(1e-300)) / G.shape[0]
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G + ridge * eye, rhs.T).T


def _diag_products(Q: torch.Tensor, P: torch.Tensor, weighted_s: torch.Tensor) -> torch.Tensor:
    """`b_i = diag(Uᵀ ΔW_i V)` from `Q = L_iᵀU`, `P = R_iᵀV`: `(n, k)` fp64."""
    return ((Q.double() * weighted_s.unsqueeze(-1)) * P.double()).sum(1)


def _captured(b: torch.Tensor, sigma: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """`2 σ·b − σᵀGσ` per adapter: the part of `‖ΔW_i‖²` explained by `U diag(σ_i) Vᵀ`."""
    return 2 * (sigma * b).sum(1) - ((sigma @ G) * sigma).sum(1)


class _ALS:
    """State of the full-size ALS: bases, projections `Q = L_iᵀU`, `P = R_iᵀV` and σ (weighted)."""

    def __init__(self, stack: CanonicalStack, weighted_s: torch.Tensor, U: torch.Tensor, V: torch.Tensor):
        self.stack, self.ws = stack, weighted_s
        self.flat_l, self.flat_r = stack.flat_lt(), stack.flat_rt()
        self.U, self.V = U.double(), V.double()
        self.Q = self._project(self.flat_l, self.U)
        self.P = self._project(self.flat_r, self.V)
        self.update_sigma()

    def _project(self, flat: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return gemm(flat, X.float()).reshape(self.stack.n, self.stack.r, -1)

    def gram(self) -> torch.Tensor:
        return (self.U.T @ self.U) * (self.V.T @ self.V)

    def update_sigma(self) -> None:
        self.b = _diag_products(self.Q, self.P, self.ws)
        self.sigma = _solve(self.gram(), self.b)

    def captured(self) -> float:
        return float(_captured(self.b, self.sigma, self.gram()).sum())

    def _side(self, flat: torch.Tensor, other_proj: torch.Tensor, other_basis: torch.Tensor) -> torch.Tensor:
        # Σ_i x_i S_i (other_i) D_i, solved against (otherᵀother) ⊙ Σ σσᵀ.
        rhs = (other_proj * self.ws.unsqueeze(-1).float() * self.sigma.unsqueeze(1).float())
        N = gemm(flat.T, rhs.reshape(-1, rhs.shape[-1])).double()
        return _solve((other_basis.T @ other_basis) * (self.sigma.T @ self.sigma), N)

    def step(self) -> None:
        self.U = self._side(self.flat_l, self.P, self.V)
        self.Q = self._project(self.flat_l, self.U)
        self.V = self._side(self.flat_r, self.Q, self.U)
        self.P = self._project(self.flat_r, self.V)
        self.update_sigma()
        self._balance()

    def _balance(self) -> None:
        """Unit-norm columns of U and V, magnitude in σ (the objective is unchanged)."""
        norm_u = self.U.norm(dim=0).clamp_min(1e-300)
        norm_v = self.V.norm(dim=0).clamp_min(1e-300)
        self.U, self.V = self.U / norm_u, self.V / norm_v
        self.Q = (self.Q.double() / norm_u).float()
        self.P = (self.P.double() / norm_v).float()
        self.sigma = self.sigma * norm_u * norm_v
        self.b = self.b / (norm_u * norm_v)


def _tucker_start(stack: CanonicalStack, k: int, weights: torch.Tensor, tol: float,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """CP fit of the JD-Full (Tucker) core at rank `2k`, lifted to full size."""
    k_t = min(2 * k, stack.d_out, stack.d_in)
    tucker = jd_full(stack, k_t, weights=weights, tol=tol, max_iter=50, generator=generator)
    # Core of adapter i: (U_tᵀ L_i)(w_i S_i R_iᵀ V_t), as a factor pair in stack layout.
    Q = gemm(stack.flat_lt(), tucker.U).reshape(stack.n, stack.r, k_t)
    P = gemm(stack.flat_rt(), tucker.V).reshape(stack.n, stack.r, k_t)
    core = canonicalize(Q, P * (stack.s * weights.unsqueeze(1)).unsqueeze(-1).float())
    start = jd_full(core, k, tol=tol, max_iter=50, generator=generator)
    state = _ALS(core, core.s, start.U, start.V)
    previous = state.captured()
    for _ in range(500):
        state.step()
        captured = state.captured()
        if captured - previous <= 1e-8 * max(captured, 1e-300):
            break
        previous = captured
    return tucker.U.double() @ state.U, tucker.V.double() @ state.V


@few_threads()
def jd_diag(
    stack: CanonicalStack,
    k: int,
    weights: torch.Tensor | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    tol: float = 1e-3,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
) -> CompressionResult:
    """Joint diagonalisation with diagonal `Σ_i` of one module's stack.

    Args:
        stack: The canonical stack of the adapters.
        k: Number of shared rank-one terms (`≤ min(d_out, d_in)`).
        weights: Per-adapter weights `w_i` (`1/‖ΔW_i‖` for Frobenius normalisation); `None` means 1.
        init: Starting `(U, V)`; `None`: CP of the rank-`2k` Tucker core.
        tol: Stop when an iteration changes the weighted relative error `e` by less than `tol · min(e, 1 − e)`.
        max_iter: Maximum number of full-size ALS iterations.
        generator: Random generator of the initialisation.
    """
    if not 0 < k <= min(stack.d_out, stack.d_in):
        raise ValueError(f"rank {k} must be in [1, min(d_out={stack.d_out}, d_in={stack.d_in})].")
    weights = torch.ones(stack.n, dtype=torch.float64) if weights is None else weights.double()
    weighted_s = stack.s * weights.unsqueeze(1)
    total = float((weighted_s**2).sum())
    U, V = init if init is not None else _tucker_start(stack, k, weights, tol, generator)
    state = _ALS(stack, weighted_s, U, V)
    state._balance()
    result = CompressionResult(U=U, V=V, sigma=torch.empty(0), captured=torch.empty(0))
    result.history.append(_relative_error(state.captured(), total))
    for iteration in range(1, max_iter + 1):
        state.step()
        result.iterations = iteration
        result.history.append(_relative_error(state.captured(), total))
        if converged(result.history, tol):
            result.converged = True
            break
    # σ_i of the unweighted update: the per-adapter least squares does not depend on the weights.
    b = _diag_products(state.Q, state.P, stack.s)
    sigma = _solve(state.gram(), b)
    result.U, result.V = state.U.float(), state.V.float()
    result.sigma = sigma.float()
    result.captured = _captured(b, sigma, state.gram()).clamp_min(0)
    return result


def _relative_error(captured: float, total: float) -> float:
    return max(0.0, 1.0 - captured / total) if total > 0 else 0.0
