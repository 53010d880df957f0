"""CPU micro-benchmark of one adapted projection: JD-LoRA PyTorch kernel vs a single LoRA vs PEFT's mixed batch.

At SmolLM2-135M shapes (q_proj 576→576, k/v_proj 576→192, rank 16), for a batch of B = 32 sequences whose adapters
are drawn uniformly from a collection of N, it times the adapter update added to an existing base output `y`:

* `single_lora`: one LoRA for every row, the GEMM pair `y += s · (x Aᵀ) Bᵀ` (the "single LoRA" reference);
* `peft_mixed`: PEFT's own `lora.Linear` with N adapters loaded, called with `adapter_names=` (its per-adapter loop),
  minus the base layer's time, so that only the adapter work is compared;
* `jd_torch`: `jd_lora_apply_torch` with N adapters in 1 cluster and, when N ≥ 25, in 25 clusters.

T = B · L tokens: L = 1 (decode, T = 32) and L = 64 (prefill, T = 2048). Prints one JSON document.

    python benchmarks/kernel_bench.py            # full: N ∈ {1, 8, 100, 1000}, T ∈ {32, 2048}
    python benchmarks/kernel_bench.py --quick    # seconds: N ∈ {1, 100}, T = 32, fewer repeats
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch


SHAPES = {"q_proj": (576, 576), "kv_proj": (576, 192)}
BATCH = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: N ∈ {1, 100}, decode only")
    parser.add_argument("--adapters", type=int, nargs="+", default=None, help="collection sizes N")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None, help="tokens per sequence (T = 32 · L)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (median reported)")
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT's mixed batch (slow to build at N=1000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.adapters = args.adapters or ([1, 100] if args.quick else [1, 8, 100, 1000])
    args.seq_lens = args.seq_lens or ([1] if args.quick else [1, 64])
    args.repeats = args.repeats or (5 if args.quick else 30)
    return args


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median wall-clock and median CPU time of this thread, in ms. With one intra-op thread the CPU time is the
    robust figure on a shared machine: it does not count the time the process waits for a core."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.thread_time()
        fn()
        cpu.append(time.thread_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def peft_lora_layer(in_features: int, out_features: int, rank: int, num_adapters: int, gen: torch.Generator):
    """PEFT `lora.Linear` with `num_adapters` random adapters (names `a0`, `a1`, …), in eval mode."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    config = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False)
    base = torch.nn.Linear(in_features, out_features, bias=False)
    layer = LoraLinear(base, "a0", config=config, r=rank, lora_alpha=2 * rank)
    for i in range(1, num_adapters):
        layer.update_layer(f"a{i}", r=rank, lora_alpha=2 * rank, config=config)
    with torch.no_grad():
        for name in layer.lora_B:
            layer.lora_B[name].weight.normal_(generator=gen)
    return layer.eval()


def bench_shape(module: str, seq_len: int, num_adapters: int, args: argparse.Namespace) -> list[dict]:
    from peft_jd.kernels import jd_lora_apply_torch

    in_features, out_features = SHAPES[module]
    rank, tokens = args.rank, BATCH * seq_len
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(tokens, in_features, generator=gen)
    y = torch.randn(tokens, out_features, generator=gen)
    seq_adapter = torch.randint(0, num_adapters, (BATCH,), generator=gen)
    records = []

    def record(method: str, times: tuple[float, float], **extra) -> None:
        records.append({"module": module, "in": in_features, "out": out_features, "r": rank, "B": BATCH,
                        "L": seq_len, "T": tokens, "N": num_adapters, "method": method, "wall_ms": round(times[0], 4),
                        "cpu_ms": round(times[1], 4), **extra})

    lora_A = torch.randn(rank, in_features, generator=gen) / in_features**0.5
    lora_B = torch.randn(out_features, rank, generator=gen)
    record("single_lora", median_ms(lambda: y.addmm_(x @ lora_A.T, lora_B.T, alpha=2.0), args.repeats))

    for clusters in sorted({1, 25} if num_adapters >= 25 else {1}):
        U = torch.linalg.qr(torch.randn(clusters, out_features, rank, generator=gen))[0]
        V = torch.linalg.qr(torch.randn(clusters, in_features, rank, generator=gen))[0]
        sigma = torch.randn(num_adapters + 1, rank, rank, generator=gen)
        sigma[0] = 0
        slot_cluster = torch.randint(0, clusters, (num_adapters + 1,), generator=gen)
        scaling = torch.ones(num_adapters + 1)
        slot_index = (seq_adapter + 1).repeat_interleave(seq_len)
        jd_args = (y, x, U, V, sigma, slot_index, slot_cluster, scaling)
        times = median_ms(functools.partial(jd_lora_apply_torch, *jd_args), args.repeats)
        record("jd_torch", times, clusters=clusters, adapter_bytes=sigma.numel() * 4,
               shared_bytes=(U.numel() + V.numel()) * 4)

    if not args.no_peft:
        layer = peft_lora_layer(in_features, out_features, rank, num_adapters, gen)
        names = [f"a{int(i)}" for i in seq_adapter]
        x3 = x.view(BATCH, seq_len, in_features)
        with torch.no_grad():
            base = median_ms(lambda: layer.base_layer(x3), args.repeats)
            full = median_ms(lambda: layer(x3, adapter_names=names), args.repeats)
        lora_bytes = sum(p.numel() * 4 for n, p in layer.named_parameters() if "lora_" in n)
        record("peft_mixed", (max(full[0] - base[0], 0.0), max(full[1] - base[1], 0.0)),
               base_layer_cpu_ms=round(base[1], 4), adapter_bytes=lora_bytes)
    single = records[0]["cpu_ms"]
    for rec in records:
        rec["x_single_lora_cpu"] = round(rec["cpu_ms"] / single, 3) if single > 0 else None
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for seq_len in args.seq_lens:
        for num_adapters in args.adapters:
            for module in SHAPES:
                results.extend(bench_shape(module, seq_len, num_adapters, args))
    report = {
        "benchmark": "kernel_bench",
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "quick": args.quick,
        "note": "wall_ms / cpu_ms = median wall-clock / thread-CPU time of the adapter update only (added to an "
                "existing y; for peft_mixed: its forward minus the base layer's); x_single_lora_cpu = cpu_ms / "
                "single_lora cpu_ms of the same shape",
        "results": results,
    }
    json.dump(report, sys.stdout, indent=1)
    print()
    print_table(results)
    return 0


def print_table(results: list[dict]) -> None:
    """Readable summary on stderr (stdout stays pure JSON)."""
    print(f"{'module':8} {'T':>5} {'N':>5} {'method':12} {'C':>3} {'cpu ms':>9} {'× single':>9}", file=sys.stderr)
    for rec in results:
        print(f"{rec['module']:8} {rec['T']:5d} {rec['N']:5d} {rec['method']:12} {rec.get('clusters', ''):>3} "
              f"{rec['cpu_ms']:9.4f} {rec['x_single_lora_cpu']:9.3f}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
