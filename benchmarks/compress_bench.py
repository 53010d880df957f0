"""Compression benchmark at Mistral-7B q/k/v shapes on synthetic "trained-like" LoRA collections; prints JSON.

Collections: every adapter belongs to one of 25 latent clusters with its own 32-dim column and row subspaces,
`B = U_lat G + noise`, `A = H V_latᵀ + noise`, rank 16, log-normal norms (as trained LoRAs differ in size).
Each (shape, n, method, clusters) is measured in a fresh process (peak RSS is per configuration):
canonicalisation + compression seconds per module, iterations, mean err² = mean (‖ΔW−ΔŴ‖/‖ΔW‖)².
The paper's reference JD-Full (10 alternations of randomized SVD of the stacked `[ΔW_i V]`, the official code's
recipe, on the same normalised updates) runs at equal rank for comparison. Reading is timed on real adapter files
(full Mistral q/k/v, bf16, written here and evicted from the page cache), per adapter and module. The result is
extrapolated to 1,000 adapters × 96 modules (32 layers × q, k, v).

`jd-full-budget` / `jd-diag-budget` time what `compress --budget` does per module (one solve at 1.5× the rank, the
nested reordering that gives the error at every smaller rank, and the refinement at the allocated rank, here
`--rank`); their `mean_err2` is that of the refined solution, to compare with the plain solve at `--rank`.

Full run (about 15 minutes on 2 cores; run alone):
    python benchmarks/compress_bench.py --normalization-study --out benchmarks/compress_bench.json
Check the script quickly (tiny shapes, < 1 minute):
    python benchmarks/compress_bench.py --quick
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path


MISTRAL_SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096)}  # (out, in); v_proj has k_proj's shape
QUICK_SHAPES = {"q_proj": (256, 256), "k_proj": (64, 256)}
LATENT_CLUSTERS, LATENT_DIM, NOISE = 25, 32, 0.4


def synthetic_stack(n: int, d_out: int, d_in: int, rank: int, seed: int, latent_clusters: int = LATENT_CLUSTERS,
                    latent_dim: int = LATENT_DIM, noise: float = NOISE):
    """Trained-like factors, generated in chunks straight into the `(n, r, d)` buffers the reader fills."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    latent_dim = min(latent_dim, d_out, d_in)
    U_lat = torch.linalg.qr(torch.randn(latent_clusters, d_out, latent_dim, generator=gen))[0]
    V_lat = torch.linalg.qr(torch.randn(latent_clusters, d_in, latent_dim, generator=gen))[0]
    truth = torch.randint(0, latent_clusters, (n,), generator=gen)
    bt, a = torch.empty(n, rank, d_out), torch.empty(n, rank, d_in)
    for start in range(0, n, 64):
        idx = slice(start, min(n, start + 64))
        m = idx.stop - idx.start
        c = truth[idx]
        signal_b = (U_lat[c] @ torch.randn(m, latent_dim, rank, generator=gen)).transpose(1, 2)
        bt[idx] = signal_b + noise * (latent_dim / d_out) ** 0.5 * torch.randn(m, rank, d_out, generator=gen)
        a[idx] = torch.randn(m, rank, latent_dim, generator=gen) @ V_lat[c].transpose(1, 2)
        a[idx] += noise * (latent_dim / d_in) ** 0.5 * torch.randn(m, rank, d_in, generator=gen)
        bt[idx] *= torch.exp(0.5 * torch.randn(m, 1, 1, generator=gen))
    return bt, a, truth


def reference_jd_full(stack, k: int, alternations: int = 10, seed: int = 0) -> float:
    """The official code's JD-Full: random orthonormal start, then `alternations` times U ← top-k left singular
    vectors of `[ΔW_1 V | … | ΔW_n V]` by `torch.svd_lowrank(q=k+2, niter=2)`, then V likewise. Updates are
    normalised to unit Frobenius norm (the paper's final setting). Returns the mean err²."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    weights = stack.norms2().rsqrt()
    ws = (stack.s * weights.unsqueeze(1)).float().unsqueeze(-1)
    U = torch.linalg.qr(torch.randn(stack.d_out, k, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(stack.d_in, k, generator=gen))[0]
    flat_l, flat_r = stack.flat_lt(), stack.flat_rt()
    torch.manual_seed(seed)  # svd_lowrank draws from the global generator
    for _ in range(alternations):
        # [ΔW_i V] = L_i (S_i R_iᵀ V): the stacked (d_out, n·k) matrix, formed explicitly as in the official code.
        P = (flat_r @ V).reshape(stack.n, stack.r, k) * ws
        Y = torch.einsum("nrd,nrk->dnk", stack.lt, P).reshape(stack.d_out, -1)
        U = torch.svd_lowrank(Y, q=k + 2, niter=2)[0][:, :k]
        del Y
        Q = (flat_l @ U).reshape(stack.n, stack.r, k) * ws
        Y = torch.einsum("nrd,nrk->dnk", stack.rt, Q).reshape(stack.d_in, -1)
        V = torch.svd_lowrank(Y, q=k + 2, niter=2)[0][:, :k]
        del Y
    Q = (flat_l @ U).reshape(stack.n, stack.r, k).double()
    P = (flat_r @ V).reshape(stack.n, stack.r, k).double() * stack.s.unsqueeze(-1)
    captured = (Q.transpose(1, 2) @ P).pow(2).sum((1, 2))
    return float((1 - captured / stack.norms2()).mean())


def normalization_study(quick: bool, seed: int = 0) -> list[dict]:
    """Mean err² (the paper's per-adapter metric) with and without Frobenius normalisation, on k/v-shaped
    collections whose adapter norms spread log-normally (sd 0.5 and 1.5)."""
    import torch

    from peft_jd.compression.algorithms import compress_stack, module_generator
    from peft_jd.compression.stack import canonicalize

    d_out, d_in = QUICK_SHAPES["k_proj"] if quick else MISTRAL_SHAPES["k_proj"]
    rows = []
    for n, clusters in ([(30, 4)] if quick else [(100, 1), (100, 10), (300, 1), (300, 25)]):
        for spread in (0.5, 1.5):
            bt, a, _ = synthetic_stack(n, d_out, d_in, 16, seed)
            bt *= torch.exp((spread - 0.5) * torch.randn(n, 1, 1, generator=torch.Generator().manual_seed(seed + 1)))
            stack = canonicalize(bt, a)
            energy = stack.norms2()
            row = {"n": n, "clusters": clusters, "log_norm_sd": spread}
            for normalize in (True, False):
                result = compress_stack(stack, "jd-full", 16, clusters, normalize=normalize,
                                        generator=module_generator(seed, "normalization"))
                key = "normalized" if normalize else "raw"
                row[f"{key}_mean_err2"] = float(result.err2.mean())
                row[f"{key}_energy_weighted_err2"] = float((result.err2 * energy).sum() / energy.sum())
            rows.append(row)
    return rows


def budgeted_module(stack, task: dict) -> dict:
    """What `compress --budget` does per module when the budget's uniform rank is `rank`: one solve at the largest
    rank a module may get (1.5×), the nested reordering of its components, and the refinement at the rank the
    allocation gives it (here `rank`)."""
    import math

    from peft_jd.compression.algorithms import compress_stack, module_generator, normalization_weights
    from peft_jd.compression.budgeted import MAX_RANK_FACTOR, refine
    from peft_jd.compression.nested import nest

    method = task["method"].removesuffix("-budget")
    diagonal = method == "jd-diag"
    max_rank = math.ceil(MAX_RANK_FACTOR["diag" if diagonal else "full"] * task["rank"])
    result = compress_stack(stack, method, max_rank, task["clusters"], normalize=task["normalize"],
                            generator=module_generator(task["seed"], "bench"))
    weights = normalization_weights(stack, task["normalize"])
    nested = nest(result, stack, diagonal, weights)
    refined = refine(nested.truncate(task["rank"]), stack, method, weights, 1e-3, 100)
    return {"mean_err2": float(refined.err2.mean()), "max_rank": max_rank,
            "mean_err2_truncated": float(nested.err2[:, task["rank"] - 1].mean()),
            "mean_err2_at_max_rank": float(nested.err2[:, -1].mean()), "iterations": result.iterations,
            "rounds": result.rounds, "num_clusters": int(result.U.shape[0])}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(task: dict) -> dict:
    """One configuration in a fresh process."""
    import torch

    from peft_jd.compression.algorithms import compress_stack, module_generator
    from peft_jd.compression.stack import canonicalize

    bt, a, _ = synthetic_stack(task["n"], task["d_out"], task["d_in"], task["lora_rank"], seed=task["seed"])
    rss_data = _peak_rss_mb()
    t0 = time.perf_counter()
    stack = canonicalize(bt, a)
    t1 = time.perf_counter()
    out = dict(task)
    if task["method"] == "reference":
        out["mean_err2"] = reference_jd_full(stack, task["rank"])
    elif task["method"].endswith("-budget"):
        out.update(budgeted_module(stack, task))
    else:
        result = compress_stack(stack, task["method"], task["rank"], task["clusters"], normalize=task["normalize"],
                                generator=module_generator(task["seed"], "bench"))
        out.update(mean_err2=float(result.err2.mean()), iterations=result.iterations, rounds=result.rounds,
                   num_clusters=int(result.U.shape[0]))
    t2 = time.perf_counter()
    out.update(seconds_canonicalize=t1 - t0, seconds_compress=t2 - t1, seconds_module=t2 - t0,
               peak_rss_mb=_peak_rss_mb(), rss_after_data_mb=rss_data, threads=torch.get_num_threads())
    return out


def write_adapters(root: Path, count: int, shapes: dict, layers: int, rank: int) -> list[Path]:
    """Real PEFT LoRA folders (bf16 safetensors) at the benchmark shapes; evicted from the page cache."""
    import torch
    from safetensors.torch import save_file

    paths = []
    gen = torch.Generator().manual_seed(0)
    for i in range(count):
        tensors = {}
        for layer in range(layers):
            for name, (d_out, d_in) in {**shapes, "v_proj": shapes["k_proj"]}.items():
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen).bfloat16()
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen).bfloat16()
        path = root / f"lora-{i:04d}"
        path.mkdir()
        save_file(tensors, path / "adapter_model.safetensors")
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "k_proj", "v_proj"],
            "base_model_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2", "task_type": "CAUSAL_LM"}))
        paths.append(path)
    for path in paths:
        _evict(path / "adapter_model.safetensors")
    return paths


def _evict(path: Path) -> None:
    """Drops a file from the page cache (after flushing it), so that the next read comes from disk."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure_reading(count: int, shapes: dict, layers: int, rank: int) -> dict:
    """Seconds to read one module of one adapter file into the fp32 stack (open, read two tensors, close, convert,
    check for NaN/inf; as `compress` does), from disk (`cold`) and from the page cache (`warm`)."""
    from peft_jd.compression.lora_io import load_lora
    from peft_jd.compression.stack import read_factors

    with tempfile.TemporaryDirectory(prefix="jd-bench-") as tmp:
        paths = write_adapters(Path(tmp), count, shapes, layers, rank)
        adapters = [load_lora(str(p)) for p in paths]
        modules = sorted(adapters[0].modules)
        result = {}
        for label, evict in (("cold", True), ("warm", False)):
            if evict:
                for path in paths:
                    _evict(path / "adapter_model.safetensors")
            start = time.perf_counter()
            for module_key in modules:
                read_factors(adapters, module_key)
            result[f"seconds_per_adapter_module_{label}"] = (time.perf_counter() - start) / (len(modules) * count)
        result.update(adapters=count, modules=len(modules),
                      bytes_per_adapter=(paths[0] / "adapter_model.safetensors").stat().st_size)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and sizes, to check the script")
    parser.add_argument("--n", type=int, nargs="+", default=None, help="collection sizes (default 100 1000)")
    parser.add_argument("--methods", nargs="+", default=["svd", "jd-full", "jd-diag", "reference"])
    parser.add_argument("--clusters", type=int, nargs="+", default=[1, 25], help="cluster counts of jd-* methods")
    parser.add_argument("--rank", type=int, default=16, help="rank k of the bases")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--no-normalize", dest="normalize", action="store_false")
    parser.add_argument("--read-adapters", type=int, default=16, help="adapter files written to time reading")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modules", nargs="+", default=None, help="only these shapes (q_proj, k_proj)")
    parser.add_argument("--in-process", action="store_true",
                        help="no fresh process per configuration (faster; peak RSS is then cumulative)")
    parser.add_argument("--normalization-study", action="store_true",
                        help="also compare mean err² with and without Frobenius normalisation")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else MISTRAL_SHAPES
    if args.modules:
        shapes = {name: shapes[name] for name in args.modules}
    sizes = args.n or ([20, 40] if args.quick else [100, 1000])
    clusters = [min(c, 4) for c in args.clusters] if args.quick else args.clusters
    layers = 2 if args.quick else 32
    tasks = []
    for n in sizes:
        for name, (d_out, d_in) in shapes.items():
            for method in args.methods:
                for c in ([1] if method in ("svd", "reference") else clusters):
                    tasks.append(dict(n=n, module=name, d_out=d_out, d_in=d_in, method=method, clusters=c,
                                      rank=args.rank, lora_rank=args.lora_rank, normalize=args.normalize,
                                      seed=args.seed))
    in_process = args.in_process or args.quick
    if args.quick:
        import torch

        torch.set_num_threads(1)  # tiny shapes: thread synchronisation would dominate
    context = multiprocessing.get_context("spawn")

    def run(function, *arguments):
        if in_process:
            return function(*arguments)
        with context.Pool(1) as pool:  # a fresh process per configuration: clean peak RSS
            return pool.apply(function, arguments)

    results = []
    for task in tasks:
        results.append(run(measure, task))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    read_shapes = {**MISTRAL_SHAPES, **shapes} if not args.quick else QUICK_SHAPES
    reading = run(measure_reading, min(args.read_adapters, 4) if args.quick else args.read_adapters, read_shapes,
                  layers, args.lora_rank)
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {"shapes": shapes, "latent_clusters": LATENT_CLUSTERS, "latent_dim": LATENT_DIM, "noise": NOISE,
                     "rank": args.rank, "lora_rank": args.lora_rank, "normalize": args.normalize,
                     "quick": args.quick, "in_process": in_process},
        "results": results,
        "reading": reading,
        "extrapolation": extrapolate(results, reading, layers, max(sizes)),
    }
    if args.normalization_study:
        report["normalization"] = run(normalization_study, args.quick, args.seed)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def extrapolate(results: list[dict], reading: dict, layers: int, n: int) -> list[dict]:
    """Minutes for `n` adapters × (layers × q, k, v): compute per module plus cold reading of every adapter module."""
    rows = []
    for method, clusters in sorted({(r["method"], r["clusters"]) for r in results if r["n"] == n}):
        per = {r["module"]: r for r in results if r["n"] == n and r["method"] == method and r["clusters"] == clusters}
        if set(per) != {"q_proj", "k_proj"}:
            continue
        compute = layers * (per["q_proj"]["seconds_module"] + 2 * per["k_proj"]["seconds_module"])
        read = 3 * layers * n * reading["seconds_per_adapter_module_cold"]
        mean_err2 = (per["q_proj"]["mean_err2"] + 2 * per["k_proj"]["mean_err2"]) / 3
        rows.append({"method": method, "clusters": clusters, "n": n, "modules": 3 * layers,
                     "compute_minutes": compute / 60, "read_minutes": read / 60,
                     "total_minutes": (compute + read) / 60, "mean_err2": mean_err2,
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in per.values())})
    return rows


if __name__ == "__main__":
    sys.exit(main())
