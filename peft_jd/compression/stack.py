"""Stacks of LoRA updates of one module, in the factored layouts the joint methods work on.

Every adapter's update `ΔW_i = s_i B_i A_i` is rewritten once, per module, as its exact thin SVD
`ΔW_i = L_i diag(σ_i) R_iᵀ` from `r×r` Gram matrices of the factors (never the `d_out×d_in` product). Afterwards all
joint methods only need skinny GEMMs against the row-stacked `L_iᵀ` (`(n·r, d_out)`) and `R_iᵀ` (`(n·r, d_in)`),
norms are free (`‖ΔW_i‖²_F = Σ σ_i²`) and the per-adapter truncated SVD is a slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .lora_io import LoraAdapter
from .threads import few_threads, gemm, parallel_map


# Directions whose singular value is below this fraction of the adapter's largest are rounding noise of fp32 factors.
_RELATIVE_RANK_CUTOFF = 1e-7
_CHUNK = 64


@dataclass
class CanonicalStack:
    """Thin SVDs of `n` updates of one module, zero-padded to a common rank `r`.

    Args:
        lt: `(n, r, d_out)`; row `j` of adapter `i` is the `j`-th left singular vector of `ΔW_i`.
        rt: `(n, r, d_in)`; right singular vectors, same layout.
        s: `(n, r)` singular values (descending, zeros for padding), fp64.
    """

    lt: torch.Tensor
    rt: torch.Tensor
    s: torch.Tensor

    @property
    def n(self) -> int:
        return self.lt.shape[0]

    @property
    def r(self) -> int:
        return self.lt.shape[1]

    @property
    def d_out(self) -> int:
        return self.lt.shape[2]

    @property
    def d_in(self) -> int:
        return self.rt.shape[2]

    def norms2(self) -> torch.Tensor:
        """`‖ΔW_i‖²_F`, `(n,)` fp64."""
        return (self.s**2).sum(1)

    def select(self, index: torch.Tensor) -> CanonicalStack:
        """The sub-stack of the adapters in `index` (a view when it is all adapters in order)."""
        if index.numel() == self.n and bool((index == torch.arange(self.n, device=index.device)).all()):
            return self
        return CanonicalStack(self.lt[index], self.rt[index], self.s[index])

    def flat_lt(self) -> torch.Tensor:
        return self.lt.reshape(-1, self.d_out)

    def flat_rt(self) -> torch.Tensor:
        return self.rt.reshape(-1, self.d_in)

    def dense(self, i: int) -> torch.Tensor:
        """Dense `ΔW_i` (for tests and tiny modules only)."""
        return (self.lt[i].double().T * self.s[i]) @ self.rt[i].double()


def _orthonormalizer(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For batched PSD Grams `XᵀX`, returns `(T, Λ^½ Eᵀ)` with `X T` orthonormal (dropped directions zeroed)."""
    evals, evecs = torch.linalg.eigh(gram)
    evals = evals.clamp_min(0)
    keep = evals > evals[..., -1:] * _RELATIVE_RANK_CUTOFF**2
    root = torch.where(keep, evals.sqrt(), torch.zeros_like(evals))
    inv_root = torch.where(keep, 1 / root.clamp_min(torch.finfo(root.dtype).tiny), torch.zeros_like(evals))
    return evecs * inv_root.unsqueeze(-2), root.unsqueeze(-1) * evecs.transpose(-1, -2)


@few_threads()
def canonicalize(bt: torch.Tensor, a: torch.Tensor) -> CanonicalStack:
    """Thin SVD of every `ΔW_i = B_i A_i` from the factors, in place of the inputs' storage where possible.

    Args:
        bt: `(n, r, d_out)`, the transposed `B_i` (scaling already folded in). Overwritten.
        a: `(n, r, d_in)`, the `A_i`. Overwritten.

    Returns:
        A [`CanonicalStack`] reusing the two buffers.
    """
    n, r, _ = bt.shape
    s = torch.zeros(n, r, dtype=torch.float64, device=bt.device)

    def chunk_svd(start: int) -> None:
        chunk = slice(start, start + _CHUNK)
        b64, a64 = bt[chunk].double(), a[chunk].double()
        inv_b, root_b = _orthonormalizer(gemm(b64, b64.transpose(1, 2)))
        inv_a, root_a = _orthonormalizer(gemm(a64, a64.transpose(1, 2)))
        # ΔW = (B T_b)(Λ_b^½ E_bᵀ)(E_a Λ_a^½)(T_aᵀ A) with orthonormal outer factors; SVD of the small core.
        core = root_b @ root_a.transpose(1, 2)
        left, sigma, right_h = torch.linalg.svd(core)
        to_left = (inv_b @ left).transpose(1, 2)  # rows: left singular vectors as combinations of B's columns
        to_right = right_h @ inv_a.transpose(1, 2)
        bt[chunk] = gemm(to_left, b64).to(bt.dtype)
        a[chunk] = gemm(to_right, a64).to(a.dtype)
        s[chunk] = sigma

    parallel_map(chunk_svd, range(0, n, _CHUNK))  # chunks write disjoint rows
    return CanonicalStack(lt=bt, rt=a, s=s)


def stack_from_factors(factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
                       device: torch.device | str = "cpu") -> CanonicalStack:
    """Canonical stack from in-memory `(lora_A (r, d_in), lora_B (d_out, r), scaling)` triples."""
    r_max = max(lora_a.shape[0] for lora_a, _, _ in factors)
    d_in, d_out = factors[0][0].shape[1], factors[0][1].shape[0]
    bt = torch.zeros(len(factors), r_max, d_out, device=device)
    a = torch.zeros(len(factors), r_max, d_in, device=device)
    for i, (lora_a, lora_b, scaling) in enumerate(factors):
        rank = lora_a.shape[0]
        bt[i, :rank] = lora_b.T.to(device, torch.float32) * scaling
        a[i, :rank] = lora_a.to(device, torch.float32)
    return canonicalize(bt, a)


@few_threads()
def read_factors(adapters: Sequence[LoraAdapter], module_key: str,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Reads one module's factors from every adapter file (that module's tensors only), scaling folded into `B`.

    Returns:
        `bt (n, r_max, d_out)` (the transposed `B_i`) and `a (n, r_max, d_in)`, fp32, zero-padded to the largest rank.
    """
    shapes = [adapter.modules[module_key] for adapter in adapters]
    r_max = max(shape.rank for shape in shapes)
    bt = torch.zeros(len(adapters), r_max, shapes[0].out_features, device=device)
    a = torch.zeros(len(adapters), r_max, shapes[0].in_features, device=device)
    scaling = torch.tensor([adapter.scaling(module_key) for adapter in adapters], device=device)
    for i, adapter in enumerate(adapters):
        lora_a, lora_b = adapter.read_module(module_key, check=False)
        bt[i, : lora_a.shape[0]].copy_(lora_b.T)
        a[i, : lora_a.shape[0]].copy_(lora_a)
    # One vectorised check instead of two per adapter; the error still names the file.
    finite = torch.isfinite(bt).flatten(1).all(1) & torch.isfinite(a).flatten(1).all(1)
    if not bool(finite.all()):
        raise adapters[int((~finite).nonzero()[0])].non_finite_error(module_key)
    bt.mul_(scaling.view(-1, 1, 1))
    return bt, a


def read_module_stack(adapters: Sequence[LoraAdapter], module_key: str,
                      device: torch.device | str = "cpu") -> CanonicalStack:
    """Reads one module of every adapter (`read_factors`) and canonicalizes it.

    Peak memory is about two fp32 stacks of the module: `n · r_max · (d_in + d_out) · 4` bytes.
    """
    return canonicalize(*read_factors(adapters, module_key, device))
