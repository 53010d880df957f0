"""Batched JD-LoRA kernels: one entry point, `jd_lora_apply`, with a PyTorch path everywhere and Triton on CUDA.

Backend choice: the `backend` argument, else the `PEFT_JD_KERNEL` environment variable (`auto`, `torch`, `triton`),
else `auto` (Triton when the tensors are on CUDA and Triton imports, PyTorch otherwise). Callers in a hot loop (the
tuner's layers, the serving engines) resolve it once with `select_backend` when their tensors are placed and pass the
result; `jd_lora_apply` then neither reads the environment nor probes Triton.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Union

import torch

from .torch_ops import apply_sigma, jd_lora_apply_torch


__all__ = ["apply_sigma", "jd_lora_apply", "jd_lora_apply_torch", "select_backend", "triton_available"]

_BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    try:
        from . import triton_ops  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(device: torch.device, backend: Optional[str] = None) -> str:
    """Resolves `auto` to `torch` or `triton` for tensors on `device`."""
    backend = (backend or os.environ.get("PEFT_JD_KERNEL", "auto")).lower()
    if backend not in _BACKENDS:
        raise ValueError(f"unknown JD-LoRA kernel backend {backend!r}; choose one of {_BACKENDS} (PEFT_JD_KERNEL).")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise ImportError("PEFT_JD_KERNEL=triton but triton is not installed: pip install 'peft-jd[triton]'.")
    return backend


def jd_lora_apply(
    y: torch.Tensor,
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    sigma_stack: torch.Tensor,
    slot_index: torch.Tensor,
    slot_cluster: torch.Tensor,
    scaling: Union[float, torch.Tensor] = 1.0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Adds the JD-LoRA update of every row to `y` in place and returns `y`.

    For row t with slot `a = slot_index[t]` and cluster `c = slot_cluster[a]`:
    `y[t] += scaling[a] · U[c] (Σ[a] (V[c]ᵀ x[t]))`. Slot 0 is by convention all-zero Σ (rows without adapter).

    Args:
        y: `(T, out_features)` output rows, updated in place.
        x: `(T, in_features)` input rows.
        U: `(num_clusters, out_features, r)` shared output bases.
        V: `(num_clusters, in_features, r)` shared input bases.
        sigma_stack: `(num_slots, r, r)` full Σ or `(num_slots, r)` diagonal Σ.
        slot_index: `(T,)` int64 slot per row.
        slot_cluster: `(num_slots,)` int64 cluster per slot.
        scaling: A float, or a `(num_slots,)` tensor of per-slot multipliers.
        backend: `"torch"` or `"triton"` (resolved by the caller with `select_backend`), or `None`/`"auto"` to
            resolve it here (see module docstring).
    """
    if backend not in ("torch", "triton"):
        backend = select_backend(x.device, backend)
    if backend == "triton":
        from .triton_ops import jd_lora_apply_triton

        return jd_lora_apply_triton(y, x, U, V, sigma_stack, slot_index, slot_cluster, scaling)
    return jd_lora_apply_torch(y, x, U, V, sigma_stack, slot_index, slot_cluster, scaling)
