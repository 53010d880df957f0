"""Triton JD-LoRA kernels against the dense reference and the PyTorch path.

On a machine without CUDA the kernels run under the Triton interpreter (`TRITON_INTERPRET=1`, set below before the
kernels are defined) on small CPU tensors; with CUDA they run compiled on the GPU (`benchmarks/gpu_check.sh`), where
the CUDA-only tests also check that a call never synchronises and replays inside a CUDA graph.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch


ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import kernel_reference as ref  # noqa: E402

from peft_jd.kernels import jd_lora_apply, jd_lora_apply_torch, triton_kernels, triton_ops  # noqa: E402
from peft_jd.kernels.triton_ops import TritonLaunchConfig, default_launch_config, jd_lora_apply_triton  # noqa: E402


if not ON_CUDA and not triton_ops.interpreter_enabled():
    # Another test imported the kernels without the interpreter; compiled kernels cannot run on CPU: redefine them.
    importlib.reload(triton_kernels)

DEVICE = "cuda" if ON_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tiny tiles give many row tiles, several split-K slices and several output blocks even at test sizes.
SMALL_TILES = TritonLaunchConfig(block_t=16, block_k=16, block_n=16, split_k=3)


def problem_on_device(**kwargs) -> dict:
    return ref.make_problem(device=DEVICE, **kwargs)


def check_triton(problem: dict, dtype: torch.dtype, what: str, config=None) -> torch.Tensor:
    """Triton result vs the dense reference, vs the PyTorch path, and `__base__` rows untouched."""
    y = ref.check_against_reference(lambda **kw: jd_lora_apply_triton(**kw, config=config), problem, dtype, what)
    y_torch = ref.run_kernel(jd_lora_apply_torch, problem)
    delta_torch = (y_torch.double() - problem["y"].double()).cpu().numpy()
    ref.assert_close_to_reference(y, problem["y"], delta_torch, dtype, f"{what} vs torch path")
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_clusters", [1, 3])
@pytest.mark.parametrize("sigma_type", ["full", "diag"])
def test_matches_reference_odd_sizes(sigma_type, num_clusters, dtype):
    # r = 5 (not a power of two), in = 70 and out = 50 (not multiples of a block), T = 37 (not a multiple of BLOCK_T).
    problem = problem_on_device(num_clusters=num_clusters, sigma_type=sigma_type, dtype=dtype)
    check_triton(problem, dtype, f"{sigma_type}/{num_clusters} clusters/{dtype}")


@pytest.mark.parametrize("num_clusters", [1, 4])
@pytest.mark.parametrize("sigma_type", ["full", "diag"])
@pytest.mark.parametrize(
    "config",
    [SMALL_TILES, TritonLaunchConfig(block_t=16, block_k=32, block_n=32, split_k=1, sort_rows=True),
     TritonLaunchConfig(block_t=16, sort_rows=False, split_k=2, block_i=2)],
    ids=["small-tiles-split3", "sorted-nosplit", "unsorted-split2"],
)
def test_launch_configs(config, sigma_type, num_clusters):
    problem = problem_on_device(num_rows=53, in_features=83, out_features=45, rank=7, num_clusters=num_clusters,
                                sigma_type=sigma_type, seed=11)
    check_triton(problem, torch.float32, f"{config}", config=config)


@pytest.mark.parametrize("num_clusters", [1, 3])
@pytest.mark.parametrize("config", [None, SMALL_TILES], ids=["default", "small-tiles"])
def test_even_shapes(config, num_clusters):
    # in/out multiples of the blocks and r = 16 = R_PAD: the kernels drop their k, n and r masks.
    problem = problem_on_device(num_rows=40, in_features=64, out_features=48, rank=16, num_clusters=num_clusters,
                                seed=15)
    check_triton(problem, torch.float32, f"even shapes {config}", config=config)


@pytest.mark.parametrize("rank", [1, 16, 17])
def test_ranks(rank):
    problem = problem_on_device(rank=rank, num_clusters=2, seed=rank)
    check_triton(problem, torch.float32, f"r={rank}")


@pytest.mark.parametrize("num_rows", [0, 1, 2])
def test_tiny_batches(num_rows):
    problem = problem_on_device(num_rows=num_rows, num_clusters=3, base_rows=1)
    check_triton(problem, torch.float32, f"T={num_rows}")


def test_small_features():
    # in/out smaller than the smallest block (16): every load is partly masked.
    problem = problem_on_device(in_features=9, out_features=6, rank=3, num_clusters=2, seed=4)
    check_triton(problem, torch.float32, "in=9, out=6")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_clusters", [1, 3])
@pytest.mark.parametrize("sigma_type", ["full", "diag"])
def test_non_contiguous_inputs(sigma_type, num_clusters, dtype):
    problem = problem_on_device(num_clusters=num_clusters, sigma_type=sigma_type, dtype=dtype, seed=6)
    strided = ref.non_contiguous(problem)
    y_fused = strided.pop("y_fused")
    y_before = y_fused.clone()
    jd_lora_apply_triton(**strided, config=SMALL_TILES)
    width = problem["y"].shape[1]
    out = y_fused[:, 7 : 7 + width]
    ref.assert_close_to_reference(out, problem["y"], ref.dense_reference(problem), dtype, "non-contiguous")
    outside = torch.ones(y_fused.shape[1], dtype=torch.bool, device=y_fused.device)
    outside[7 : 7 + width] = False
    assert torch.equal(y_fused[:, outside], y_before[:, outside]), "columns outside the y slice were modified"
    base = problem["slot_index"] == 0
    assert torch.equal(out[base], problem["y"][base]), "__base__ rows were modified"


def test_mixed_dtypes_follow_torch_path():
    # bf16 activations with fp32 bases and Σ (bases not cast with the model): x is rounded to V's dtype, as in torch.
    problem = problem_on_device(num_clusters=2, dtype=torch.float32, seed=8)
    problem["x"] = problem["x"].to(torch.bfloat16)
    problem["y"] = problem["y"].to(torch.bfloat16)
    check_triton(problem, torch.bfloat16, "bf16 x/y, fp32 U/V/Σ")


def test_collection_sized_problem():
    # 1,000 adapters in 25 clusters plus the base slot; slots and clusters drawn uniformly, as when serving.
    problem = problem_on_device(num_rows=96, in_features=40, out_features=24, rank=4, num_clusters=25,
                                num_slots=1001, base_rows=10, seed=9)
    check_triton(problem, torch.float32, "1000 slots / 25 clusters")


def test_int32_slots_float_scaling_and_all_base_rows():
    problem = problem_on_device(num_clusters=2, scaling="float", seed=2)
    problem["slot_index"] = problem["slot_index"].to(torch.int32)
    problem["slot_cluster"] = problem["slot_cluster"].to(torch.int32)
    check_triton(problem, torch.float32, "int32 slots, float scaling")
    problem["slot_index"] = torch.zeros_like(problem["slot_index"])
    y = ref.run_kernel(jd_lora_apply_triton, problem)
    assert torch.equal(y, problem["y"])


def test_dispatch_forced_triton(monkeypatch):
    problem = problem_on_device(num_clusters=2, seed=12)
    monkeypatch.setenv("PEFT_JD_KERNEL", "triton")
    y = ref.run_kernel(jd_lora_apply, problem)
    expected = ref.dense_reference(problem)
    ref.assert_close_to_reference(y, problem["y"], expected, torch.float32, "PEFT_JD_KERNEL=triton")


def test_bad_inputs_name_the_problem():
    problem = problem_on_device()
    with pytest.raises(ValueError, match="bases are for a 70→50 layer"):
        jd_lora_apply_triton(**{**problem, "x": problem["x"][:, :60]})
    with pytest.raises(ValueError, match="sigma_stack"):
        jd_lora_apply_triton(**{**problem, "sigma_stack": problem["sigma_stack"][:, :4]})
    with pytest.raises(ValueError, match="scaling"):
        jd_lora_apply_triton(**{**problem, "scaling": problem["scaling"][:3]})
    with pytest.raises(TypeError, match="PEFT_JD_KERNEL=torch"):
        jd_lora_apply_triton(**{**problem, "x": problem["x"].double(), "y": problem["y"].double()})


def test_default_launch_config_is_shape_only():
    cpu = torch.device("cpu")
    decode = default_launch_config(32, 4096, 1024, 16, 25, cpu)
    assert decode.block_t == 32 and decode.sort_rows is False and decode.split_k >= 1
    prefill = default_launch_config(4096, 4096, 1024, 64, 25, cpu)
    assert prefill.sort_rows is True and prefill.block_t == 64
    assert prefill.block_t * prefill.block_i * 64 <= 8192
    fixed = default_launch_config(4096, 4096, 1024, 16, 1, cpu, TritonLaunchConfig(split_k=2, block_n=32))
    assert fixed.split_k == 2 and fixed.block_n == 32 and fixed.sort_rows is False


# --------------------------------------------------------------------------------------------------- CUDA only
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA GPU")


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sigma_type", ["full", "diag"])
def test_cuda_mistral_shapes(sigma_type, dtype):
    problem = problem_on_device(num_rows=300, in_features=4096, out_features=1024, rank=64, num_clusters=25,
                                num_slots=1001, sigma_type=sigma_type, dtype=dtype, base_rows=30, seed=13)
    check_triton(problem, dtype, f"Mistral k/v shapes {sigma_type} {dtype}")


@cuda_only
def test_cuda_no_host_sync_and_graph_capture():
    # 300 rows and 5 clusters: rows are sorted on the device; in_features 2048: split-K with a zeroed fp32 buffer.
    problem = problem_on_device(num_rows=300, in_features=2048, out_features=128, rank=16, num_clusters=5,
                                num_slots=50, dtype=torch.bfloat16, seed=14)
    config = default_launch_config(300, 2048, 128, 16, 5, torch.device(DEVICE))
    assert config.sort_rows and config.split_k > 1
    jd_lora_apply_triton(**{**problem, "y": problem["y"].clone()})  # compile outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        jd_lora_apply_triton(**{**problem, "y": problem["y"].clone()})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static = {**problem, "y": problem["y"].clone(), "slot_index": problem["slot_index"].clone()}
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        jd_lora_apply_triton(**{**static, "y": static["y"].clone()})  # warm-up on the capture stream
        with torch.cuda.graph(graph, stream=stream):
            jd_lora_apply_triton(**static)
    torch.cuda.current_stream().wait_stream(stream)
    new_slots = torch.randint(0, 50, problem["slot_index"].shape, device=DEVICE)
    static["slot_index"].copy_(new_slots)
    static["y"].copy_(problem["y"])
    graph.replay()
    torch.cuda.synchronize()
    replayed = {**problem, "slot_index": new_slots}
    expected = ref.dense_reference(replayed)
    ref.assert_close_to_reference(static["y"], problem["y"], expected, torch.bfloat16, "graph replay")
