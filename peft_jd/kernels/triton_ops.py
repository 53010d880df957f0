"""Triton implementation of the batched JD-LoRA update (CUDA; CPU only under `TRITON_INTERPRET=1`).

`jd_lora_apply_triton` has the semantics of `peft_jd.kernels.jd_lora_apply_torch` and launches two kernels
(`triton_kernels.py`): a shrink GEMM with the per-row Σ gather and scaling fused into its epilogue, then an expand GEMM
that accumulates into `y` in place. With several clusters the rows are first sorted by cluster on the device. Launch
parameters depend only on shapes, dtypes and the device, and nothing reads device memory on the host, so a call can
be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from . import triton_kernels as _kernels


__all__ = ["TritonLaunchConfig", "default_launch_config", "interpreter_enabled", "jd_lora_apply_triton"]

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
# A split-K program reduces at least this many BLOCK_K chunks: fewer would multiply the Σ epilogue and the atomics.
_MIN_K_BLOCKS_PER_SPLIT = 4
# Bound on the (BLOCK_T, BLOCK_I, R_PAD) temporary of the full-Σ epilogue, in elements.
_SIGMA_TILE_ELEMENTS = 8192


@dataclass(frozen=True)
class TritonLaunchConfig:
    """Tile sizes of one `jd_lora_apply_triton` call; `None` fields are chosen by `default_launch_config`.

    Args:
        block_t: Rows per tile (a power of two ≥ 16).
        block_k: Reduction chunk of the shrink GEMM over `in_features` (a power of two ≥ 16).
        block_n: Output columns per expand program (a power of two ≥ 16).
        split_k: Number of programs sharing the reduction of one row tile (atomic fp32 accumulation of `g`).
        block_i: Σ output coordinates per step of the full-Σ epilogue (a power of two).
        num_warps: Warps per program.
        num_stages: Software-pipelining depth of the shrink loop.
        sort_rows: Sort rows by cluster before the GEMMs (default: with several clusters and more than one tile).
    """

    block_t: Optional[int] = None
    block_k: Optional[int] = None
    block_n: Optional[int] = None
    split_k: Optional[int] = None
    block_i: Optional[int] = None
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None
    sort_rows: Optional[bool] = None


def interpreter_enabled() -> bool:
    """Whether the kernels were defined under `TRITON_INTERPRET=1` (they then run on CPU tensors, slowly)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kernels.jd_shrink_sigma_kernel, InterpretedFunction)


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_programs_target(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: small, but enough to exercise split-K in tests
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 2 * _multiprocessor_count(index)


def _pow2_at_least_16(value: int) -> int:
    return max(16, triton.next_power_of_2(value))


def default_launch_config(
    num_rows: int, in_features: int, out_features: int, rank: int, num_clusters: int, device: torch.device,
    config: Optional[TritonLaunchConfig] = None,
) -> TritonLaunchConfig:
    """Fills the unset fields of `config` from the problem shape (never from tensor contents).

    Args:
        num_rows: Number of rows T.
        in_features: Input width (reduction length of the shrink).
        out_features: Output width.
        rank: Rank r of the bases.
        num_clusters: Number of clusters of the bases.
        device: Device of the tensors (its multiprocessor count sizes split-K).
        config: Fields fixed by the caller.
    """
    config = config or TritonLaunchConfig()
    r_pad = _pow2_at_least_16(rank)
    block_t = config.block_t or (16 if num_rows <= 16 else 32 if num_rows <= 32 else 64)
    block_k = config.block_k or min(128 if r_pad <= 32 else 64, _pow2_at_least_16(in_features))
    num_tiles = triton.cdiv(num_rows, block_t)
    k_blocks = triton.cdiv(in_features, block_k)
    split_k = config.split_k
    if split_k is None:
        wanted = triton.cdiv(_num_programs_target(device), num_tiles)
        split_k = max(1, min(wanted, k_blocks // _MIN_K_BLOCKS_PER_SPLIT))
    split_k = max(1, min(split_k, k_blocks))
    block_n = config.block_n or (64 if num_rows <= 64 or out_features <= 1024 else 128)
    block_n = min(block_n, _pow2_at_least_16(out_features))
    block_i = config.block_i or max(1, min(r_pad, _SIGMA_TILE_ELEMENTS // (block_t * r_pad)))
    sort_rows = config.sort_rows if config.sort_rows is not None else (num_clusters > 1 and num_rows > block_t)
    return replace(
        config, block_t=block_t, block_k=block_k, block_n=block_n, split_k=split_k, block_i=block_i,
        num_warps=config.num_warps or 4, num_stages=config.num_stages or (3 if r_pad <= 32 else 2),
        sort_rows=sort_rows,
    )


def _check_inputs(y, x, U, V, sigma_stack, slot_index, slot_cluster, scaling) -> None:
    """Shape, dtype and device checks of `jd_lora_apply_triton`'s arguments that read no device memory (slot values
    are trusted, see docs/kernels.md)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"JD-LoRA kernel: x {tuple(x.shape)} and y {tuple(y.shape)} must be (T, in) and (T, out).")
    if U.dim() != 3 or V.dim() != 3 or U.shape[0] != V.shape[0] or U.shape[2] != V.shape[2]:
        raise ValueError(
            f"JD-LoRA kernel: bases U {tuple(U.shape)} / V {tuple(V.shape)} must be (c, out, r) / (c, in, r)."
        )
    if V.shape[1] != x.shape[1] or U.shape[1] != y.shape[1]:
        raise ValueError(
            f"JD-LoRA kernel: bases are for a {V.shape[1]}→{U.shape[1]} layer but x/y are {x.shape[1]}→{y.shape[1]}."
        )
    rank = U.shape[2]
    expected = (rank, rank) if sigma_stack.dim() == 3 else (rank,)
    if sigma_stack.dim() not in (2, 3) or tuple(sigma_stack.shape[1:]) != expected:
        raise ValueError(f"JD-LoRA kernel: sigma_stack {tuple(sigma_stack.shape)} must be (slots, {rank}, {rank}) or "
                         f"(slots, {rank}).")
    if slot_index.shape != (x.shape[0],) or slot_cluster.shape != (sigma_stack.shape[0],):
        raise ValueError(f"JD-LoRA kernel: slot_index {tuple(slot_index.shape)} must be ({x.shape[0]},) and "
                         f"slot_cluster {tuple(slot_cluster.shape)} must be ({sigma_stack.shape[0]},).")
    if isinstance(scaling, torch.Tensor) and scaling.shape != (sigma_stack.shape[0],):
        raise ValueError(
            f"JD-LoRA kernel: scaling {tuple(scaling.shape)} must be a float or ({sigma_stack.shape[0]},)."
        )
    tensors = {"y": y, "x": x, "U": U, "V": V, "sigma_stack": sigma_stack, "slot_index": slot_index,
               "slot_cluster": slot_cluster}
    if isinstance(scaling, torch.Tensor):
        tensors["scaling"] = scaling
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"JD-LoRA kernel: all tensors must be on one device, got {devices}.")
    if x.device.type != "cuda" and not interpreter_enabled():
        raise ValueError(f"the Triton JD-LoRA kernels need CUDA tensors, got {x.device}; use PEFT_JD_KERNEL=torch "
                         "(or set TRITON_INTERPRET=1 before importing triton, for testing).")
    for name in ("y", "x", "U", "V", "sigma_stack"):
        if tensors[name].dtype not in _TL_DTYPES:
            raise TypeError(f"JD-LoRA Triton kernel: {name} has dtype {tensors[name].dtype}; supported: fp16, bf16, "
                            "fp32. Use PEFT_JD_KERNEL=torch for other dtypes.")
    for name in ("slot_index", "slot_cluster"):
        if tensors[name].dtype not in (torch.int32, torch.int64):
            raise TypeError(f"JD-LoRA kernel: {name} must be int32 or int64, got {tensors[name].dtype}.")


def _input_precision(dtype: torch.dtype) -> Optional[str]:
    """fp32 dots follow torch's TF32 switch, as `torch.matmul` would; other dtypes have one precision."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _dot_dtype(dtype: torch.dtype, interpret: bool) -> tuple[tl.dtype, bool]:
    """Operand dtype of a dot and whether to multiply in fp32 (the interpreter has no bf16 dot)."""
    return _TL_DTYPES[dtype], interpret and dtype == torch.bfloat16


def _row_order(slot_index: torch.Tensor, slot_cluster: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Row permutation grouping rows by cluster, `__base__` rows last; computed on the device without a sync."""
    row_cluster = slot_cluster.index_select(0, slot_index)
    key = torch.where(slot_index == 0, torch.full_like(row_cluster, num_clusters), row_cluster)
    return torch.argsort(key)


def jd_lora_apply_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    sigma_stack: torch.Tensor,
    slot_index: torch.Tensor,
    slot_cluster: torch.Tensor,
    scaling: Union[float, torch.Tensor] = 1.0,
    *,
    config: Optional[TritonLaunchConfig] = None,
) -> torch.Tensor:
    """Adds the JD-LoRA update of every row to `y` in place and returns `y` (see `peft_jd.kernels.jd_lora_apply`).

    For row t with slot `a = slot_index[t]` and cluster `c = slot_cluster[a]`:
    `y[t] += scaling[a] · U[c] (Σ[a] (V[c]ᵀ x[t]))`. Rows of slot 0 (`__base__`, whose Σ is zero) are skipped. Inputs
    may be fp16, bf16 or fp32 and strided (e.g. `y` a column slice of a fused q/k/v output); products accumulate in
    fp32, `x` is rounded to `V`'s dtype and `Σ V[c]ᵀ x` to `U`'s dtype before the expand, as in the PyTorch path.

    Args:
        y, x, U, V, sigma_stack, slot_index, slot_cluster, scaling: As in `peft_jd.kernels.jd_lora_apply`; the slot
            tensors may be int32 or int64, and their values, which must lie in `[0, num_slots)` and
            `[0, num_clusters)`, are not checked (that would synchronise).
        config: Tile sizes; unset fields come from `default_launch_config`.
    """
    _check_inputs(y, x, U, V, sigma_stack, slot_index, slot_cluster, scaling)
    num_rows, in_features = x.shape
    num_clusters, out_features, rank = U.shape
    if num_rows == 0 or out_features == 0 or rank == 0:
        return y
    cfg = default_launch_config(num_rows, in_features, out_features, rank, num_clusters, x.device, config)
    interpret = interpreter_enabled()
    r_pad = _pow2_at_least_16(rank)
    slot_index = slot_index.contiguous()
    slot_cluster = slot_cluster.contiguous()
    order = _row_order(slot_index, slot_cluster, num_clusters) if cfg.sort_rows else None
    if isinstance(scaling, torch.Tensor):
        scaling_tensor, scaling_value = scaling.contiguous(), 1.0
    else:
        scaling_tensor, scaling_value = None, float(scaling)

    k_blocks = triton.cdiv(in_features, cfg.block_k)
    k_per_split = triton.cdiv(k_blocks, cfg.split_k) * cfg.block_k
    split_k = triton.cdiv(in_features, k_per_split)
    num_tiles = triton.cdiv(num_rows, cfg.block_t)
    alloc = torch.zeros if split_k > 1 else torch.empty
    g = alloc((num_rows, r_pad), dtype=torch.float32, device=x.device)
    full_sigma = sigma_stack.dim() == 3
    v_dot, v_upcast = _dot_dtype(V.dtype, interpret)
    _kernels.jd_shrink_sigma_kernel[(num_tiles, split_k)](
        x, V, sigma_stack, scaling_tensor if scaling_tensor is not None else sigma_stack, scaling_value, g,
        order if order is not None else slot_index, slot_index, slot_cluster,
        num_rows, in_features, rank, num_clusters, k_per_split,
        x.stride(0), x.stride(1), V.stride(0), V.stride(1), V.stride(2),
        sigma_stack.stride(0), sigma_stack.stride(1), sigma_stack.stride(2) if full_sigma else 0,
        BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, R_PAD=r_pad, BLOCK_I=min(cfg.block_i, r_pad),
        HAS_ORDER=order is not None, SINGLE_CLUSTER=num_clusters == 1, FULL_SIGMA=full_sigma,
        HAS_SCALING_TENSOR=scaling_tensor is not None, USE_ATOMIC=split_k > 1,
        EVEN_K=in_features % cfg.block_k == 0, EVEN_R=rank == r_pad,
        DOT_DTYPE=v_dot, UPCAST=v_upcast, INPUT_PRECISION=_input_precision(V.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    u_dot, u_upcast = _dot_dtype(U.dtype, interpret)
    _kernels.jd_expand_kernel[(num_tiles, triton.cdiv(out_features, cfg.block_n))](
        y, U, g, order if order is not None else slot_index, slot_index, slot_cluster,
        num_rows, out_features, rank, num_clusters,
        y.stride(0), y.stride(1), U.stride(0), U.stride(1), U.stride(2),
        BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n, R_PAD=r_pad, HAS_ORDER=order is not None,
        SINGLE_CLUSTER=num_clusters == 1, EVEN_N=out_features % cfg.block_n == 0, EVEN_R=rank == r_pad,
        DOT_DTYPE=u_dot, UPCAST=u_upcast, INPUT_PRECISION=_input_precision(U.dtype),
        num_warps=cfg.num_warps,
    )
    return y
