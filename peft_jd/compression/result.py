"""`CompressionResult`: what every solver of one module's stack returns (JD-Full, JD-Diag, clustered, SVD)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class CompressionResult:
    """Bases, per-adapter Σ and diagnostics of one module's compression.

    The single-basis solvers (`jd_full`, `jd_diag`) fill `U`, `V` as one `(d, k)` basis and leave `cluster` and
    `err2` unset; `cluster_compress` and `compress_stack` return per-cluster bases `(c, d, k)` with `cluster` set, and
    `compress_stack` adds the exact errors and the wall time.

    Args:
        U: `(d_out, k)` or `(c, d_out, k)` fp32.
        V: `(d_in, k)` or `(c, d_in, k)` fp32.
        sigma: `(n, k, k)` (full) or `(n, k)` (diag) fp32 Σ of the *unweighted* updates (LoRA scaling included).
        captured: `(n,)` fp64, the energy of each update its bases keep (`None` where not computed).
        cluster: `(n,)` long, the cluster of each adapter (`None`: one basis for all).
        err2: `(n,)` fp64, `(‖ΔW_i − ΔŴ_i‖_F / ‖ΔW_i‖_F)²` (0 for an all-zero update).
        history: Weighted relative error per iteration (one basis) or per round (clusters); never increases.
        iterations: Iterations run (all clusters and rounds).
        rounds: Reassignment rounds (0 without clusters).
        converged: Whether the last solve stopped on `tol` before `max_iter`.
        seconds: Wall time of the compression.
    """

    U: torch.Tensor
    V: torch.Tensor
    sigma: torch.Tensor
    captured: Optional[torch.Tensor] = None
    cluster: Optional[torch.Tensor] = None
    err2: Optional[torch.Tensor] = None
    history: list[float] = field(default_factory=list)
    iterations: int = 0
    rounds: int = 0
    converged: bool = False
    seconds: float = 0.0
