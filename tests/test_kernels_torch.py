"""PyTorch JD-LoRA kernel against an independent dense reference, and backend dispatch.

The reference builds every slot's dense `ΔW_a = s_a U[c_a] Σ_a V[c_a]ᵀ` in float64 with numpy and applies it row by
row; it shares no code with `peft_jd.kernels`. The reference lives in `kernel_reference.py`, shared with
`test_kernels_triton.py`.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from kernel_reference import (
    assert_close_to_reference,
    check_against_reference,
    dense_reference,
    make_problem,
    non_contiguous,
    run_kernel,
)

import peft_jd.kernels as kernels
import peft_jd.kernels.torch_ops as torch_ops
from peft_jd.kernels import jd_lora_apply, jd_lora_apply_torch, select_backend
from peft_jd.kernels.torch_ops import row_blocks


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
