"""Independent dense reference for the JD-LoRA kernel tests (PyTorch and Triton paths): random problems, a float64
numpy reference that shares no code with `peft_jd.kernels`, and the tolerance check."""

from __future__ import annotations

import numpy as np
import torch


# Relative error allowed on the update (and, scaled by |y|, on the rounding of y itself) per compute dtype.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
EPS = {torch.float32: 1.2e-7, torch.float16: 9.8e-4, torch.bfloat16: 7.9e-3}


def make_problem(
    num_rows: int = 37,
    in_features: int = 70,
    out_features: int = 50,
    rank: int = 5,
    num_clusters: int = 1,
    num_slots: int = 7,
    sigma_type: str = "full",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    scaling: str = "tensor",
    base_rows: int = 5,
    seed: int = 0,
) -> dict:
    """Random inputs of `jd_lora_apply` with slot 0 all-zero, `base_rows` rows on slot 0, every other slot used."""
    gen = torch.Generator().manual_seed(seed)
    sigma_shape = (num_slots, rank, rank) if sigma_type == "full" else (num_slots, rank)
    sigma = torch.randn(sigma_shape, generator=gen)
    sigma[0] = 0
    slot_index = torch.randint(1, num_slots, (num_rows,), generator=gen)
    slot_index[torch.randperm(num_rows, generator=gen)[: min(base_rows, num_rows)]] = 0
    slot_cluster = torch.randint(0, num_clusters, (num_slots,), generator=gen)
    slot_cluster[0] = 0
    if scaling == "tensor":
        scale = torch.rand(num_slots, generator=gen) + 0.5
    else:
        scale = 0.75
    problem = {
        "y": torch.randn(num_rows, out_features, generator=gen),
        "x": torch.randn(num_rows, in_features, generator=gen),
        "U": torch.randn(num_clusters, out_features, rank, generator=gen) / rank**0.5,
        "V": torch.randn(num_clusters, in_features, rank, generator=gen) / in_features**0.5,
        "sigma_stack": sigma,
        "slot_index": slot_index,
        "slot_cluster": slot_cluster,
        "scaling": scale,
    }
    for name in ("y", "x", "U", "V"):
        problem[name] = problem[name].to(dtype)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in problem.items()}


def dense_reference(problem: dict, max_dense_elements: int = 20_000_000) -> np.ndarray:
    """`(T, out)` float64 update, computed with numpy only: from each used slot's dense
    `ΔW_a = s_a U[c_a] Σ_a V[c_a]ᵀ` when these fit in `max_dense_elements`, else in factored form (large GPU cases)."""
    U = problem["U"].double().cpu().numpy()
    V = problem["V"].double().cpu().numpy()
    sigma = problem["sigma_stack"].double().cpu().numpy()
    slot_cluster = problem["slot_cluster"].cpu().numpy()
    scaling = problem["scaling"]
    scale = scaling.double().cpu().numpy() if isinstance(scaling, torch.Tensor) else np.full(sigma.shape[0], scaling)
    x = problem["x"].double().cpu().numpy()
    slots = problem["slot_index"].cpu().numpy()
    used = np.unique(slots)
    dense = used.size * U.shape[1] * V.shape[1] <= max_dense_elements
    delta = np.zeros((x.shape[0], U.shape[1]))
    for slot in used:
        c = slot_cluster[slot]
        sig = sigma[slot] if sigma.ndim == 3 else np.diag(sigma[slot])
        rows = slots == slot
        if dense:
            delta[rows] = x[rows] @ (scale[slot] * U[c] @ sig @ V[c].T).T
        else:
            delta[rows] = scale[slot] * (((x[rows] @ V[c]) @ sig.T) @ U[c].T)
    return delta


def assert_close_to_reference(
    y_out: torch.Tensor, y_in: torch.Tensor, delta: np.ndarray, dtype: torch.dtype, what: str = ""
) -> None:
    """`y_out ≈ y_in + delta` up to the update's precision and the rounding of y to its dtype."""
    out = y_out.double().cpu().numpy()
    expected = y_in.double().cpu().numpy() + delta
    assert np.isfinite(out).all(), f"{what}: non-finite output"
    err = np.linalg.norm(out - expected)
    bound = TOLERANCE[dtype] * np.linalg.norm(delta) + EPS[dtype] * np.linalg.norm(expected)
    assert err <= bound, f"{what}: ‖out − ref‖ = {err:.3e} > {bound:.3e} (‖ΔY‖ = {np.linalg.norm(delta):.3e})"
    if out.size == 0:
        return
    worst = np.abs(out - expected).max()
    worst_bound = 8 * TOLERANCE[dtype] * np.abs(delta).max() + 2 * EPS[dtype] * np.abs(expected).max()
    assert worst <= worst_bound, f"{what}: max |out − ref| = {worst:.3e} > {worst_bound:.3e}"


def run_kernel(fn, problem: dict, **overrides) -> torch.Tensor:
    args = {**problem, **overrides}
    y = args["y"].clone()
    args["y"] = y
    result = fn(**args)
    assert result is y or result.data_ptr() == y.data_ptr(), "the kernel must update y in place and return it"
    return y


def check_against_reference(fn, problem: dict, dtype: torch.dtype, what: str = "") -> torch.Tensor:
    y = run_kernel(fn, problem)
    assert_close_to_reference(y, problem["y"], dense_reference(problem), dtype, what)
    base = (problem["slot_index"] == 0).cpu()
    assert torch.equal(y.cpu()[base], problem["y"].cpu()[base]), f"{what}: __base__ rows were modified"
    return y


# ------------------------------------------------------------------------------------------------------ torch path


def non_contiguous(problem: dict) -> dict:
    """The same problem with every tensor argument strided: y a column slice of a wider (fused q/k/v) output, x
    transposed storage, U a slice of a wider tensor, V transposed storage, Σ and slots taken with a step."""
    num_rows, out_features = problem["y"].shape
    y_fused = torch.randn(num_rows, out_features + 20, dtype=problem["y"].dtype, device=problem["y"].device)
    y_fused[:, 7 : 7 + out_features] = problem["y"]
    x = problem["x"].T.contiguous().T
    U_padded = torch.zeros((*problem["U"].shape[:2], problem["U"].shape[2] + 3), dtype=problem["U"].dtype,
                           device=problem["U"].device)
    U_padded[..., 1 : 1 + problem["U"].shape[2]] = problem["U"]
    U = U_padded[..., 1 : 1 + problem["U"].shape[2]]
    V = problem["V"].transpose(1, 2).contiguous().transpose(1, 2)
    sigma = problem["sigma_stack"]
    sigma_strided = torch.zeros((sigma.shape[0] * 2, *sigma.shape[1:]), dtype=sigma.dtype, device=sigma.device)
    sigma_strided[::2] = sigma
    if sigma.dim() == 3:
        sigma_view = sigma_strided[::2].transpose(1, 2).contiguous().transpose(1, 2)
    else:
        sigma_view = sigma_strided[::2]
    slot_index = torch.stack([problem["slot_index"], problem["slot_index"]], dim=1)[:, 0]
    assert not (x.is_contiguous() or U.is_contiguous() or V.is_contiguous() or slot_index.is_contiguous())
    return {
        "y": y_fused[:, 7 : 7 + out_features], "y_fused": y_fused, "x": x, "U": U, "V": V, "sigma_stack": sigma_view,
        "slot_index": slot_index, "slot_cluster": problem["slot_cluster"], "scaling": problem["scaling"],
    }
