"""One-shot GPU check of the JD-LoRA kernels: Triton tests on CUDA, then a kernel micro-benchmark. Prints JSON.

Meant to be run blind on a lent GPU (see `benchmarks/gpu_check.sh` and docs/kernels.md) and to finish well inside five
minutes: the tests run in a subprocess with a timeout (on 8 pytest-xdist workers when available, since compiling the
kernel variants dominates), the benchmark compiles its kernels in parallel worker processes first and stops adding
cases when `--time-budget` is spent. Every failure is recorded in the JSON instead of aborting the run.

Benchmark: Mistral-7B shapes (in 4096; out 4096 = q_proj, 1024 = k/v_proj), r ∈ {16, 64}, T ∈ {1 … 4096} tokens in
min(T, 32) sequences whose adapters are drawn uniformly from 1,000 (clusters drawn uniformly from 1 or 25), bf16,
full Σ. Per case: the Triton path (eager and replayed from a CUDA graph), the PyTorch path, and a single LoRA's GEMM
pair `y += (x Aᵀ) Bᵀ` (eager and graph), median times from `triton.testing`; plus the Triton result's relative error
against the PyTorch path and its bandwidth over a lower bound of the bytes it must move.

Without CUDA (`--device cpu`) it times the PyTorch path and the GEMM pair only, for checking the script itself.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional


ROOT = Path(__file__).resolve().parents[1]
TEST_FILE = "tests/test_kernels_triton.py"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="JD-LoRA kernels: Triton tests on CUDA and micro-benchmark (JSON).")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="a few small cases (smoke test of this script)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the Triton tests")
    parser.add_argument("--tests-timeout", type=float, default=150.0, help="at most this many seconds for the tests")
    parser.add_argument("--time-budget", type=float, default=240.0,
                        help="seconds for the whole run: no benchmark case starts after it is spent")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="T values (default 1 16 64 256 1024 4096)")
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="r values (default 16 64)")
    parser.add_argument("--clusters", type=int, nargs="+", default=[1, 25])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--out-features", type=int, nargs="+", default=None, help="default 1024 4096")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--sigma-type", choices=["full", "diag"], default="full")
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-configuration sweep")
    parser.add_argument("--compile-workers", type=int, default=8, help="processes compiling kernels up front (0: off)")
    parser.add_argument("--out", default=None, help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    defaults = {"tokens": ([1, 64], [1, 16, 64, 256, 1024, 4096]), "ranks": ([16], [16, 64]),
                "out_features": ([1024], [1024, 4096])}
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("tokens", "ranks", "clusters", "out_features"):
        if any(v <= 0 for v in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} values must be positive")
    if args.adapters <= 0 or args.in_features <= 0:
        parser.error("--adapters and --in-features must be positive")
    return args


def import_kernels() -> tuple[types.ModuleType, str]:
    """`peft_jd.kernels` from this checkout. It imports neither peft nor transformers (the GPU image's versions differ
    from ours); `peft_jd/__init__.py` skips the PEFT tuner when the installed PEFT does not fit it."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("peft_jd.kernels"), "package"


# ------------------------------------------------------------------------------------------------------------ tests
def run_tests(timeout: float, test_args: tuple[str, ...] = (TEST_FILE,), workers: Optional[int] = None) -> dict:
    """Runs the Triton test file in a pytest subprocess and returns its outcome and the tail of its log.

    Args:
        timeout: Seconds before the run is stopped.
        test_args: Test files and pytest options.
        workers: pytest-xdist workers; by default 8 when xdist is installed (compiling the kernel variants dominates
            a cold run), 0 for none.
    """
    import importlib.util

    command = [sys.executable, "-m", "pytest", *test_args, "-q", "-x", "-p", "no:cacheprovider", "-p", "gpu_check"]
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if importlib.util.find_spec("xdist") is not None else 0
    if workers > 0:
        command += ["-n", str(workers)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "benchmarks"), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, returncode = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        returncode = None
    lines = [line for line in output.splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if " passed" in line or " failed" in line or "error" in line), "")
    return {"command": " ".join(command[1:]), "returncode": returncode, "timed_out": returncode is None,
            "summary": summary.strip("= "), "seconds": round(time.perf_counter() - start, 1),
            "log_tail": "\n".join(lines[-40:])}


def pytest_configure(config) -> None:
    """Pytest plugin hook (`-p gpu_check`, in every xdist worker too): the package stub if `import peft_jd` fails."""
    import_kernels()


# -------------------------------------------------------------------------------------------------------- benchmark
def make_case(torch, T: int, in_f: int, out_f: int, r: int, clusters: int, args, device: str, seed: int = 0):
    """Inputs of one benchmark case: `min(T, 32)` sequences, adapters uniform over `args.adapters`."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    num_slots = args.adapters + 1
    sequences = min(T, 32)
    seq_slots = torch.randint(1, num_slots, (sequences,), generator=gen)
    slot_index = seq_slots.repeat_interleave(-(-T // sequences))[:T]
    sigma_shape = (num_slots, r, r) if args.sigma_type == "full" else (num_slots, r)
    case = {
        "y": torch.randn(T, out_f, generator=gen).to(dtype),
        "x": torch.randn(T, in_f, generator=gen).to(dtype),
        "U": (torch.randn(clusters, out_f, r, generator=gen) / r**0.5).to(dtype),
        "V": (torch.randn(clusters, in_f, r, generator=gen) / in_f**0.5).to(dtype),
        "sigma_stack": torch.randn(sigma_shape, generator=gen) * 0.1,
        "slot_index": slot_index,
        "slot_cluster": torch.randint(0, clusters, (num_slots,), generator=gen),
        "scaling": torch.ones(num_slots),
    }
    case["sigma_stack"][0] = 0
    case = {k: v.to(device) for k, v in case.items()}
    lora = {"A": (torch.randn(r, in_f, generator=gen) / in_f**0.5).to(dtype).to(device),
            "B": torch.randn(out_f, r, generator=gen).to(dtype).to(device)}
    return case, lora


def min_bytes(case) -> int:
    """Bytes any implementation must move: x once, y read and written, the bases of the clusters present, the Σ of
    the slots present."""
    T, out_f = case["y"].shape
    slots = case["slot_index"].unique()
    present = case["slot_cluster"][slots].unique().numel()
    U, V, sigma = case["U"], case["V"], case["sigma_stack"]
    per_cluster = (U[0].numel() + V[0].numel()) * U.element_size()
    return (case["x"].numel() * case["x"].element_size() + 2 * case["y"].numel() * case["y"].element_size()
            + present * per_cluster + slots.numel() * sigma[0].numel() * sigma.element_size())


def timer(torch, device: str) -> tuple[Callable, Callable]:
    """(eager, graph) timing functions returning median ms; on CPU a plain wall-clock median."""
    if device == "cuda":
        import triton.testing

        def eager(fn):
            return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")

        def graph(fn):
            with torch.cuda.stream(torch.cuda.Stream()):
                return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")

        return eager, graph

    def cpu_eager(fn, repeats: int = 5):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * sorted(times)[len(times) // 2]

    return cpu_eager, None


def bench_case(torch, kernels, key: tuple, args, device: str, eager, graph) -> dict[str, Any]:
    T, out_f, r, clusters = key
    case, lora = make_case(torch, T, args.in_features, out_f, r, clusters, args, device)
    rec: dict[str, Any] = {"T": T, "in": args.in_features, "out": out_f, "r": r, "clusters": clusters,
                           "adapters": args.adapters, "dtype": args.dtype, "sigma": args.sigma_type}
    y, x = case["y"], case["x"]
    rest = [case[k] for k in ("U", "V", "sigma_stack", "slot_index", "slot_cluster", "scaling")]

    def single_lora():
        y.addmm_(x @ lora["A"].T, lora["B"].T)

    def torch_path():
        kernels.jd_lora_apply_torch(y, x, *rest)

    if device == "cuda":
        from peft_jd.kernels.triton_ops import jd_lora_apply_triton

        # Checked before any timing: the timed calls keep accumulating into y.
        reference = y.clone()
        kernels.jd_lora_apply_torch(reference, x, *rest)
        result = y.clone()
        jd_lora_apply_triton(result, x, *rest)
        delta = (reference.float() - y.float()).norm().item()
        rec["triton_rel_err_vs_torch"] = (result.float() - reference.float()).norm().item() / max(delta, 1e-30)

    measure(rec, "single_lora_ms", eager, single_lora)
    measure(rec, "single_lora_graph_ms", graph, single_lora)
    measure(rec, "torch_ms", eager, torch_path)
    # The sorted multi-cluster torch path reads cluster counts on the host: it cannot be captured in a graph.
    torch_ops = kernels.torch_ops
    if clusters == 1 or torch_ops._use_gathered_bases(torch_ops.row_blocks(case["slot_index"]), case["U"], case["V"]):
        measure(rec, "torch_graph_ms", graph, torch_path)
    if device == "cuda":
        def triton_path():
            jd_lora_apply_triton(y, x, *rest)

        measure(rec, "triton_ms", eager, triton_path)
        measure(rec, "triton_graph_ms", graph, triton_path)
        rec["min_bytes"] = min_bytes(case)
        if rec.get("triton_graph_ms"):
            rec["triton_graph_GBps"] = round(rec["min_bytes"] / rec["triton_graph_ms"] / 1e6, 1)
        for name in ("triton_ms", "triton_graph_ms"):
            base = rec.get("single_lora_graph_ms" if "graph" in name else "single_lora_ms")
            if rec.get(name) and base:
                rec[f"{name[:-3]}_x_single"] = round(rec[name] / base, 3)
    if rec.get("torch_ms") and rec.get("single_lora_ms"):
        rec["torch_x_single"] = round(rec["torch_ms"] / rec["single_lora_ms"], 3)
    return rec


def measure(rec: dict, name: str, timing: Optional[Callable], fn: Callable) -> None:
    if timing is None:
        return
    try:
        rec[name] = round(float(timing(fn)), 5)
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        rec[name] = None
        rec.setdefault("errors", []).append(f"{name}: {type(exc).__name__}: {exc}"[:300])


def _compile_worker(items: list[tuple[tuple, dict]], argv: list[str]) -> int:
    """Runs each (case, launch-config change) once, so that its kernels land in the on-disk Triton cache."""
    from dataclasses import replace

    import torch

    args = parse_args(argv)
    import_kernels()
    from peft_jd.kernels.triton_ops import default_launch_config, jd_lora_apply_triton

    cases = {}
    for key, change in items:
        T, out_f, r, clusters = key
        if key not in cases:
            cases = {key: make_case(torch, T, args.in_features, out_f, r, clusters, args, "cuda")[0]}
        case = cases[key]
        config = default_launch_config(T, args.in_features, out_f, r, clusters, case["x"].device)
        jd_lora_apply_triton(**case, config=replace(config, **change))
    torch.cuda.synchronize()
    return len(items)


def compile_items(keys: list[tuple], args) -> list[tuple[tuple, dict]]:
    """Work for `precompile`: every benchmark case with its default launch config, then the sweep's variants."""
    import torch

    from peft_jd.kernels.triton_ops import default_launch_config

    items = [(key, {}) for key in keys]
    if not args.no_sweep:
        for T, out_f, r, clusters in SWEEP_CASES:
            config = default_launch_config(T, args.in_features, out_f, r, clusters, torch.device("cuda"))
            items += [((T, out_f, r, clusters), change) for change in sweep_variants(config)[1:]]
    return items


def precompile(items: list[tuple[tuple, dict]], args, argv: list[str]) -> dict[str, Any]:
    """Compiles the kernels of all work items in parallel processes (compilation dominates a cold run)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = min(args.compile_workers, len(items))
    start = time.perf_counter()
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = sum(pool.map(_compile_worker, [items[i::workers] for i in range(workers)], [argv] * workers))
        return {"workers": workers, "items": done, "seconds": round(time.perf_counter() - start, 1)}
    except Exception as exc:  # noqa: BLE001 - fall back to compiling inline
        return {"workers": workers, "error": f"{type(exc).__name__}: {exc}"[:300],
                "seconds": round(time.perf_counter() - start, 1)}


def run_benchmark(torch, kernels, args, device: str, argv: list[str], deadline: float,
                  on_result: Callable[[dict], None]) -> dict[str, Any]:
    """Benchmarks every case until `deadline` (perf_counter seconds); `on_result` receives each record."""
    keys = [(T, out_f, r, c) for r in args.ranks for c in args.clusters for out_f in args.out_features
            for T in args.tokens]
    info: dict[str, Any] = {"cases_planned": len(keys)}
    if device == "cuda" and args.compile_workers > 0:
        info["precompile"] = precompile(compile_items(keys, args), args, argv)
    eager, graph = timer(torch, device)
    for key in keys:
        if time.perf_counter() > deadline:
            info.setdefault("skipped_for_time", []).append(list(key))
            continue
        try:
            rec = bench_case(torch, kernels, key, args, device, eager, graph)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: recorded, the run goes on
            rec = {"case": list(key), "error": f"{type(exc).__name__}: {exc}"[:300]}
        on_result(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return info


# ------------------------------------------------------------------------------------------------------------ sweep
# (T, out_features, r, clusters): decode and prefill, small and large rank, one and 25 clusters.
SWEEP_SECONDS = 45  # kept out of the main benchmark's time budget
SWEEP_CASES = [(16, 4096, 16, 25), (16, 1024, 64, 25), (4096, 1024, 16, 25), (4096, 4096, 64, 1), (1, 4096, 16, 1)]


def sweep_variants(config) -> list[dict[str, Any]]:
    """Launch configurations one parameter away from the default one (the default first)."""
    variants = [{}]
    variants += [{"split_k": v} for v in (1, 2, 4, 8, 16, 32) if v != config.split_k]
    variants += [{"block_t": v} for v in (16, 32, 64, 128) if v != config.block_t]
    variants += [{"block_n": v} for v in (32, 64, 128, 256) if v != config.block_n]
    variants += [{"block_k": v} for v in (32, 64, 128, 256) if v != config.block_k]
    variants += [{"num_warps": v} for v in (2, 4, 8) if v != config.num_warps]
    variants += [{"num_stages": v} for v in (2, 3, 4) if v != config.num_stages]
    variants += [{"sort_rows": not config.sort_rows}]
    return variants


def run_sweep(torch, args, deadline: float) -> list[dict[str, Any]]:
    """Times launch-configuration variants (CUDA-graph replay, so launch overhead is left out) around the defaults,
    to tune `default_launch_config`; stops at `deadline`."""
    from dataclasses import asdict, replace

    from peft_jd.kernels.triton_ops import default_launch_config, jd_lora_apply_triton

    _, graph = timer(torch, "cuda")
    sweeps = []
    for T, out_f, r, clusters in SWEEP_CASES:
        if time.perf_counter() > deadline:
            break
        case, _ = make_case(torch, T, args.in_features, out_f, r, clusters, args, "cuda")
        default = default_launch_config(T, args.in_features, out_f, r, clusters, case["x"].device)
        timings = []
        for change in sweep_variants(default):
            if time.perf_counter() > deadline:
                break
            config = replace(default, **change)
            rec = {"change": change or "default"}
            measure(rec, "graph_ms", graph, functools.partial(jd_lora_apply_triton, **case, config=config))
            timings.append(rec)
        valid = [t for t in timings if t.get("graph_ms")]
        best = min(valid, key=lambda t: t["graph_ms"]) if valid else None
        sweeps.append({"case": {"T": T, "out": out_f, "r": r, "clusters": clusters}, "default": asdict(default),
                       "best": best, "variants": timings})
        print(json.dumps(sweeps[-1]["case"] | {"best": best}), file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    return sweeps


# ------------------------------------------------------------------------------------------------------------- main
def environment(torch, device: str) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
                           "cuda_available": torch.cuda.is_available()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError as exc:
        env["triton"] = f"not importable: {exc}"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, multiprocessors=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1))
    return env


def print_table(results: list[dict]) -> None:
    cols = ["T", "out", "r", "clusters", "single_lora_ms", "single_lora_graph_ms", "torch_ms", "triton_ms",
            "triton_graph_ms", "triton_graph_x_single", "triton_graph_GBps", "triton_rel_err_vs_torch"]
    print(" ".join(f"{c[:14]:>14}" for c in cols), file=sys.stderr)
    for rec in results:
        cells = []
        for c in cols:
            value = rec.get(c)
            cells.append(f"{value:14.4g}" if isinstance(value, float) else f"{str(value):>14}")
        print(" ".join(cells), file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device == "cpu":
        torch.set_num_threads(1)  # a smoke test of the script: stable single-thread timings
    start = time.perf_counter()
    deadline = start + args.time_budget - 5
    report: dict[str, Any] = {"benchmark": "gpu_check", "argv": argv, "environment": environment(torch, device),
                              "results": []}

    def save() -> None:
        # Rewritten after every step, so that a run cut short still leaves its figures behind.
        report["seconds"] = round(time.perf_counter() - start, 1)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")

    kernels, how = import_kernels()
    report["kernels_import"] = how
    if device == "cuda" and not args.skip_tests:
        report["tests"] = run_tests(min(args.tests_timeout, 0.5 * args.time_budget))
    elif not args.skip_tests:
        report["tests"] = {"skipped": "no CUDA device: CI runs the same tests under TRITON_INTERPRET=1"}
    save()

    def on_result(rec: dict) -> None:
        report["results"].append(rec)
        save()

    sweep_reserve = 0 if device != "cuda" or args.no_sweep else SWEEP_SECONDS
    report["benchmark_info"] = run_benchmark(torch, kernels, args, device, argv, deadline - sweep_reserve, on_result)
    save()
    if device == "cuda" and not args.no_sweep:
        try:
            report["sweep"] = run_sweep(torch, args, deadline)
        except Exception as exc:  # noqa: BLE001 - the main figures are already saved
            report["sweep"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        save()
    print(json.dumps(report, indent=1))
    print_table(report["results"])
    failed = report.get("tests", {}).get("returncode") not in (None, 0)
    return 1 if failed or report.get("tests", {}).get("timed_out") else 0


if __name__ == "__main__":
    sys.exit(main())
