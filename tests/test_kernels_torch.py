"""PyTorch JD-LoRA kernel against an independent dense reference, and backend dispatch.

The reference builds every slot's dense `ΔW_a = s_a U[c_a] Σ_a V[c_a]ᵀ` in float64 with numpy and applies it row by
row; it shares no code with `peft_jd.kernels`. `make_problem` and `assert_close_to_reference` are reused by
`test_kernels_triton.py`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pytest
import torch

import peft_jd.kernels as kernels
import peft_jd.kernels.torch_ops as torch_ops
from peft_jd.kernels import jd_lora_apply, jd_lora_apply_torch, select_backend
from peft_jd.kernels.torch_ops import row_blocks


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
@pytest.mark.parametrize("sigma_type", ["full", "diag"])
@pytest.mark.parametrize("num_clusters", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaling", ["tensor", "float"])
def test_torch_matches_dense_reference(sigma_type, num_clusters, dtype, scaling):
    problem = make_problem(num_clusters=num_clusters, sigma_type=sigma_type, dtype=dtype, scaling=scaling)
    check_against_reference(jd_lora_apply_torch, problem, dtype, f"{sigma_type}/{num_clusters}/{dtype}/{scaling}")


@pytest.mark.parametrize("num_rows", [0, 1, 3])
def test_torch_tiny_batches(num_rows):
    problem = make_problem(num_rows=num_rows, num_clusters=2, base_rows=1)
    check_against_reference(jd_lora_apply_torch, problem, torch.float32, f"T={num_rows}")


def test_torch_many_slots_and_clusters():
    problem = make_problem(num_rows=200, in_features=48, out_features=24, rank=4, num_clusters=25, num_slots=1001,
                           base_rows=20, seed=3)
    check_against_reference(jd_lora_apply_torch, problem, torch.float32, "1000 slots / 25 clusters")


@pytest.mark.parametrize("num_clusters", [1, 3])
@pytest.mark.parametrize("sigma_type", ["full", "diag"])
def test_torch_non_contiguous_inputs(num_clusters, sigma_type):
    problem = make_problem(num_clusters=num_clusters, sigma_type=sigma_type, seed=5)
    strided = non_contiguous(problem)
    y_fused = strided.pop("y_fused")
    y_before = y_fused.clone()
    jd_lora_apply_torch(**strided)
    out = y_fused[:, 7 : 7 + problem["y"].shape[1]]
    assert_close_to_reference(out, problem["y"], dense_reference(problem), torch.float32, "non-contiguous")
    untouched = torch.ones(y_fused.shape[1], dtype=torch.bool)
    untouched[7 : 7 + problem["y"].shape[1]] = False
    assert torch.equal(y_fused[:, untouched], y_before[:, untouched]), "columns outside the y slice were modified"


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


def test_torch_int32_slots_and_all_base_rows():
    problem = make_problem(num_clusters=2)
    problem["slot_index"] = problem["slot_index"].to(torch.int32)
    check_against_reference(jd_lora_apply_torch, problem, torch.float32, "int32 slots")
    problem["slot_index"] = torch.zeros_like(problem["slot_index"])
    y = run_kernel(jd_lora_apply_torch, problem)
    assert torch.equal(y, problem["y"])


def sequence_slots(seq_slots: list[int], seq_len: int) -> torch.Tensor:
    """Per-token slots of a batch of sequences (one adapter per sequence), as `SlotTable.token_slots` builds them."""
    return torch.tensor(seq_slots).repeat_interleave(seq_len)


def test_row_blocks_gcd_and_cache():
    slots = torch.tensor([1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3])
    blocks = row_blocks(slots)
    assert blocks.length == 2 and blocks.slots.tolist() == [1, 1, 2, 3, 3, 3]
    assert row_blocks(slots) is blocks  # cached for the next layer of the same forward
    slots[5] = 4  # an in-place change bumps the version counter and must not reuse the cached blocks
    assert row_blocks(slots).length == 1
    assert row_blocks(torch.tensor([7, 7, 7])).length == 3
    assert row_blocks(torch.tensor([7])).length == 1


def _recording(fn, name: str, calls: list):
    def wrapper(*args):
        calls.append(name)
        return fn(*args)

    return wrapper


# Sequences of 6 tokens: adjacent sequences share adapters 3 and 1 (runs of 12), two `__base__` sequences.
PREFILL_SLOTS = [3, 3, 0, 5, 1, 1, 2, 0, 4]


@pytest.mark.parametrize("strategy", ["gathered", "sorted"])
@pytest.mark.parametrize("seq_len", [1, 6])
@pytest.mark.parametrize("sigma_type", ["full", "diag"])
def test_torch_multi_cluster_strategies(monkeypatch, strategy, seq_len, sigma_type):
    problem = make_problem(num_rows=len(PREFILL_SLOTS) * seq_len, rank=5, num_clusters=3, num_slots=6,
                           sigma_type=sigma_type, seed=21)
    problem["slot_index"] = sequence_slots(PREFILL_SLOTS, seq_len)
    monkeypatch.setattr(torch_ops, "_use_gathered_bases", lambda *args: strategy == "gathered")
    taken = []
    for name in ("_gathered_bases", "_sorted_by_cluster"):
        monkeypatch.setattr(torch_ops, name, _recording(getattr(torch_ops, name), name, taken))
    y = check_against_reference(jd_lora_apply_torch, problem, torch.float32, f"{strategy}, L={seq_len}")
    assert taken == [f"_{strategy}_bases" if strategy == "gathered" else "_sorted_by_cluster"]
    assert y.shape == problem["y"].shape


@pytest.mark.parametrize("num_clusters", [1, 3])
def test_torch_prefill_blocks_bf16_and_inference_mode(num_clusters):
    problem = make_problem(num_rows=len(PREFILL_SLOTS) * 6, num_clusters=num_clusters, num_slots=6,
                           dtype=torch.bfloat16, seed=22)
    with torch.inference_mode():
        problem["slot_index"] = sequence_slots(PREFILL_SLOTS, 6)
        check_against_reference(jd_lora_apply_torch, problem, torch.bfloat16, "prefill blocks, inference mode")


# -------------------------------------------------------------------------------------------------------- dispatch
def test_select_backend_env(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("PEFT_JD_KERNEL", raising=False)
    assert select_backend(cpu) == "torch"
    monkeypatch.setenv("PEFT_JD_KERNEL", "TORCH")
    assert select_backend(cpu) == "torch"
    monkeypatch.setenv("PEFT_JD_KERNEL", "auto")
    assert select_backend(cpu) == "torch"
    monkeypatch.setenv("PEFT_JD_KERNEL", "cuda-magic")
    with pytest.raises(ValueError, match="PEFT_JD_KERNEL"):
        select_backend(cpu)
    assert select_backend(cpu, backend="torch") == "torch"  # the argument wins over the environment


def _spy(monkeypatch, module, name: str) -> list:
    calls = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs) if name == "jd_lora_apply_torch" else args[0]

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("env", [None, "torch", "triton"])
def test_jd_lora_apply_dispatch(monkeypatch, env: Optional[str]):
    problem = make_problem(num_clusters=2)
    torch_calls = _spy(monkeypatch, kernels, "jd_lora_apply_torch")
    if env is None:
        monkeypatch.delenv("PEFT_JD_KERNEL", raising=False)
    else:
        monkeypatch.setenv("PEFT_JD_KERNEL", env)
    if env == "triton":
        triton_ops = pytest.importorskip("peft_jd.kernels.triton_ops")
        triton_calls = _spy(monkeypatch, triton_ops, "jd_lora_apply_triton")
        jd_lora_apply(**{**problem, "y": problem["y"].clone()})
        assert triton_calls == ["jd_lora_apply_triton"] and not torch_calls
        return
    y = run_kernel(jd_lora_apply, problem)
    assert torch_calls == ["jd_lora_apply_torch"]
    assert_close_to_reference(y, problem["y"], dense_reference(problem), torch.float32, f"dispatch env={env}")
