"""Triton kernels of the batched JD-LoRA update (launched by `triton_ops.jd_lora_apply_triton`).

Two launches per call:

* `jd_shrink_sigma_kernel`: `g[t] = s[a] · Σ[a] (V[c]ᵀ x[t])` for a tile of rows, fp32 accumulation. The Σ gather and
  the scaling are fused into the epilogue of the shrink GEMM, so the `(T, r, r)` gathered Σ never exists in memory.
  With split-K each program reduces a slice of `in_features` and adds its share of `g` atomically (Σ is linear).
* `jd_expand_kernel`: `y[t] += U[c] g[t]`, accumulated in place into `y` (which may be a strided slice of a fused
  q/k/v output).

Rows are addressed through an optional permutation `order` (rows sorted by cluster, so that a tile touches one or two
clusters); `g` is stored in that sorted order. Rows whose slot is 0 (`__base__`) are skipped. Each tile loops over the
clusters present in it, so one launch serves any number of clusters without a host-side loop or synchronisation.
"""

from __future__ import annotations

import triton
import triton.language as tl


# Only core `tl` builtins are called (not `tl.zeros`/`tl.sum`/`tl.max`, which are @jit functions themselves), so that
# the kernels also run under the interpreter when triton was first imported without TRITON_INTERPRET, as happens in a
# test session. Reductions pass triton's own combine functions where it has them: the interpreter recognises those
# and reduces with numpy instead of calling the combine function element by element.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


_sum_combine = getattr(tl.standard, "_sum_combine", _add)
_max_combine = getattr(tl.standard, "_elementwise_max", _maximum)
_min_combine = getattr(tl.standard, "_elementwise_min", _minimum)


@triton.jit
def _any(mask):
    """Whether any element of a 1-D boolean tensor is set (a scalar)."""
    return tl.reduce(mask.to(tl.int32), 0, _max_combine) > 0


@triton.jit
def _tile_rows(
    pid_t,
    num_rows,
    order_ptr,
    slot_index_ptr,
    slot_cluster_ptr,
    BLOCK_T: tl.constexpr,
    HAS_ORDER: tl.constexpr,
):
    """Sorted positions, original positions, clusters and activity of the rows of one tile."""
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = rows < num_rows
    if HAS_ORDER:
        pos = tl.load(order_ptr + rows, mask=valid, other=0)
    else:
        pos = rows
    slot = tl.load(slot_index_ptr + pos, mask=valid, other=0)
    active = valid & (slot != 0)
    cluster = tl.load(slot_cluster_ptr + slot, mask=active, other=0)
    return rows, pos.to(tl.int64), slot.to(tl.int64), cluster, active


@triton.jit
def _cluster_range(cluster, active, num_clusters):
    """Smallest and largest cluster of the active rows (an empty range if none is active)."""
    lo = tl.reduce(tl.where(active, cluster, num_clusters), 0, _min_combine)
    hi = tl.reduce(tl.where(active, cluster, -1), 0, _max_combine)
    return lo, hi


@triton.jit
def _dot(a, b, acc, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """`acc + a @ b` with operands rounded to `DOT_DTYPE`; `UPCAST` multiplies them in fp32 (the interpreter has no
    bf16 dot), which gives the same result as a bf16 dot with fp32 accumulation."""
    a = a.to(DOT_DTYPE)
    b = b.to(DOT_DTYPE)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def jd_shrink_sigma_kernel(
    x_ptr,
    v_ptr,
    sigma_ptr,
    scaling_ptr,
    scaling_value,
    g_ptr,
    order_ptr,
    slot_index_ptr,
    slot_cluster_ptr,
    num_rows,
    in_features,
    rank,
    num_clusters,
    k_per_split,
    stride_xt,
    stride_xk,
    stride_vc,
    stride_vk,
    stride_vr,
    stride_s0,
    stride_s1,
    stride_s2,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_I: tl.constexpr,
    HAS_ORDER: tl.constexpr,
    SINGLE_CLUSTER: tl.constexpr,
    FULL_SIGMA: tl.constexpr,
    HAS_SCALING_TENSOR: tl.constexpr,
    USE_ATOMIC: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # EVEN_K / EVEN_R: in_features is a multiple of BLOCK_K / rank == R_PAD, so the masks along k / r are dropped and
    # the loads stay vectorised (masks that vary along a row would split them).
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows, pos, slot, cluster, active = _tile_rows(
        pid_t, num_rows, order_ptr, slot_index_ptr, slot_cluster_ptr, BLOCK_T, HAS_ORDER
    )
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    r_mask = (offs_r < rank) | EVEN_R
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_features)
    x_rows = x_ptr + pos[:, None] * stride_xt
    acc = tl.full((BLOCK_T, R_PAD), 0.0, tl.float32)
    if SINGLE_CLUSTER:
        c_lo = 0
        c_hi = tl.where(_any(active), 0, -1)
    else:
        c_lo, c_hi = _cluster_range(cluster, active, num_clusters)
    for c in range(c_lo, c_hi + 1):
        in_cluster = active & (cluster == c)
        if _any(in_cluster):
            v_cluster = v_ptr + c * stride_vc
            for k0 in range(k_start, k_end, BLOCK_K):
                k_idx = k0 + offs_k
                k_mask = (k_idx < k_end) | EVEN_K
                x_tile = tl.load(x_rows + k_idx[None, :] * stride_xk, mask=in_cluster[:, None] & k_mask[None, :],
                                 other=0.0)
                v_tile = tl.load(v_cluster + k_idx[:, None] * stride_vk + offs_r[None, :] * stride_vr,
                                 mask=k_mask[:, None] & r_mask[None, :], other=0.0)
                acc = _dot(x_tile, v_tile, acc, DOT_DTYPE, UPCAST, INPUT_PRECISION)

    if HAS_SCALING_TENSOR:
        scale = tl.load(scaling_ptr + slot, mask=active, other=0.0).to(tl.float32)
    else:
        scale = tl.full((BLOCK_T,), 0.0, tl.float32) + scaling_value
    g_rows = g_ptr + rows.to(tl.int64)[:, None] * R_PAD
    sigma_rows = sigma_ptr + slot * stride_s0
    if FULL_SIGMA:
        # Σ h row by row, BLOCK_I output coordinates at a time to bound the (BLOCK_T, BLOCK_I, R_PAD) temporary.
        offs_i = tl.arange(0, BLOCK_I)
        for i0 in tl.static_range(0, R_PAD, BLOCK_I):
            i_idx = i0 + offs_i
            s_mask = active[:, None, None] & (i_idx < rank)[None, :, None] & r_mask[None, None, :]
            s_tile = tl.load(
                sigma_rows[:, None, None] + i_idx[None, :, None] * stride_s1 + offs_r[None, None, :] * stride_s2,
                mask=s_mask,
                other=0.0,
            ).to(tl.float32)
            g_part = tl.reduce(s_tile * acc[:, None, :], 2, _sum_combine) * scale[:, None]
            g_ptrs = g_rows + i_idx[None, :]
            if USE_ATOMIC:
                tl.atomic_add(g_ptrs, g_part, mask=active[:, None], sem="relaxed")
            else:
                tl.store(g_ptrs, g_part, mask=active[:, None])
    else:
        s_tile = tl.load(sigma_rows[:, None] + offs_r[None, :] * stride_s1, mask=active[:, None] & r_mask[None, :],
                         other=0.0).to(tl.float32)
        g_part = acc * s_tile * scale[:, None]
        g_ptrs = g_rows + offs_r[None, :]
        if USE_ATOMIC:
            tl.atomic_add(g_ptrs, g_part, mask=active[:, None], sem="relaxed")
        else:
            tl.store(g_ptrs, g_part, mask=active[:, None])


@triton.jit
def jd_expand_kernel(
    y_ptr,
    u_ptr,
    g_ptr,
    order_ptr,
    slot_index_ptr,
    slot_cluster_ptr,
    num_rows,
    out_features,
    rank,
    num_clusters,
    stride_yt,
    stride_yn,
    stride_uc,
    stride_un,
    stride_ur,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    R_PAD: tl.constexpr,
    HAS_ORDER: tl.constexpr,
    SINGLE_CLUSTER: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows, pos, slot, cluster, active = _tile_rows(
        pid_t, num_rows, order_ptr, slot_index_ptr, slot_cluster_ptr, BLOCK_T, HAS_ORDER
    )
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = (offs_n < out_features) | EVEN_N
    offs_r = tl.arange(0, R_PAD)
    u_mask = ((offs_r < rank) | EVEN_R)[:, None] & n_mask[None, :]
    g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * R_PAD + offs_r[None, :], mask=active[:, None], other=0.0)
    u_offsets = offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un
    acc = tl.full((BLOCK_T, BLOCK_N), 0.0, tl.float32)
    if SINGLE_CLUSTER:
        u_tile = tl.load(u_ptr + u_offsets, mask=u_mask, other=0.0)
        acc = _dot(g, u_tile, acc, DOT_DTYPE, UPCAST, INPUT_PRECISION)
    else:
        c_lo, c_hi = _cluster_range(cluster, active, num_clusters)
        for c in range(c_lo, c_hi + 1):
            in_cluster = active & (cluster == c)
            if _any(in_cluster):
                u_tile = tl.load(u_ptr + c * stride_uc + u_offsets, mask=u_mask, other=0.0)
                g_cluster = tl.where(in_cluster[:, None], g, 0.0)
                acc = _dot(g_cluster, u_tile, acc, DOT_DTYPE, UPCAST, INPUT_PRECISION)
    y_ptrs = y_ptr + pos[:, None] * stride_yt + offs_n[None, :] * stride_yn
    y_mask = active[:, None] & n_mask[None, :]
    y_old = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y_old.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=y_mask)
