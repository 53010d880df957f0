"""Mixed-batch generation throughput on SmolLM2-135M-Instruct: base, one LoRA, PEFT multi-LoRA, JD-LoRA.

B requests (prompt ≈ 64 tokens, 16 new tokens, greedy) with adapters drawn uniformly from a collection of N.
Ratios are what matter: all configurations run in one process, one after another, on the same prompts.

    python benchmarks/serve_bench.py                      # full run (~10 minutes on 2 cores)
    python benchmarks/serve_bench.py --quick              # N ∈ {1, 8}, B = 8
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from common import TARGETS, current_rss_mb, emit, load_model, write_synthetic_collection
from peft import LoraConfig, PeftModel, get_peft_model

import peft_jd


def generate_throughput(model, input_ids, new_tokens: int, repeats: int, **kwargs) -> dict:
    """Best-of-`repeats` generate time (after one warm-up) → output tokens/s and requests/s."""
    mask = torch.ones_like(input_ids)
    gen_kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(
            input_ids=input_ids[:2], attention_mask=mask[:2], **gen_kwargs, **{k: v[:2] for k, v in kwargs.items()}
        )
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(input_ids=input_ids, attention_mask=mask, **gen_kwargs, **kwargs)
            best = min(best, time.perf_counter() - start)
    produced = (out.shape[1] - input_ids.shape[1]) * input_ids.shape[0]
    return {
        "seconds": round(best, 3),
        "tokens_per_s": round(produced / best, 2),
        "requests_per_s": round(input_ids.shape[0] / best, 3),
    }


def add_peft_loras(model, count: int, rank: int) -> PeftModel:
    """A PEFT model with `count` random rank-r q/k/v LoRAs (alpha 2r), created in memory."""
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, config, adapter_name="lora-0")
    for i in range(1, count):
        peft_model.add_adapter(f"lora-{i}", config)
    return peft_model.eval()


def lora_bytes(peft_model) -> int:
    return sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if "lora_" in n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 8, 100, 1000])
    parser.add_argument("--clusters", type=int, nargs="+", default=[1, 25])
    parser.add_argument(
        "--peft-max",
        type=int,
        default=100,
        help="most PEFT LoRAs held in memory; larger N reuse them (cost depends on distinct rows only)",
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.counts, args.clusters, args.peft_max, args.repeats = 8, [1, 8], [1, 4], 8, 1
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    model = load_model()
    torch.manual_seed(0)
    input_ids = torch.randint(100, 40000, (args.batch, args.prompt_tokens))
    results: dict = {"config": vars(args), "runs": []}
    rows = []

    def record(name: str, n: int, measurement: dict, **extra) -> None:
        entry = {"setting": name, "n_adapters": n, **measurement, **extra}
        results["runs"].append(entry)
        rows.append([name, str(n), f"{measurement['tokens_per_s']:.1f}", f"{measurement['requests_per_s']:.2f}"])

    record("base model", 0, generate_throughput(model, input_ids, args.new_tokens, args.repeats))

    loaded = min(max(args.counts), max(args.peft_max, args.batch))
    peft_model = add_peft_loras(model, loaded, args.rank)
    lora_bytes_per_adapter = lora_bytes(peft_model) // loaded
    single = generate_throughput(peft_model, input_ids, args.new_tokens, args.repeats)
    record("single LoRA (PEFT, unmerged)", 1, single)
    for n in sorted(args.counts):
        # PEFT's mixed-batch cost depends on which rows share an adapter, not on how many are loaded: draw from N and
        # relabel the distinct draws onto the loaded adapters (keeps memory bounded for N = 1000).
        draws = [rng.randrange(n) for _ in range(args.batch)]
        relabel = {index: f"lora-{i}" for i, index in enumerate(dict.fromkeys(draws))}
        names = [relabel[index] for index in draws]
        measurement = generate_throughput(peft_model, input_ids, args.new_tokens, args.repeats, adapter_names=names)
        record(
            "PEFT LoRA mixed batch",
            n,
            measurement,
            distinct_in_batch=len(relabel),
            loras_loaded=min(n, loaded),
            adapter_bytes_at_n=lora_bytes_per_adapter * n,
        )
    model = peft_model.unload()
    del peft_model

    for clusters in args.clusters:
        with tempfile.TemporaryDirectory() as tmp:
            dirs = write_synthetic_collection(Path(tmp), model, max(args.counts), r=args.rank, clusters=clusters)
            rss_before = current_rss_mb()
            start = time.perf_counter()
            jd_model = PeftModel.from_pretrained(model, dirs[0], adapter_name=Path(dirs[0]).name)
            loaded = 1
            for n in sorted(args.counts):
                peft_jd.load_adapters(jd_model, dirs[loaded:n], progress=False)
                loaded = max(loaded, n)
                load_s = time.perf_counter() - start
                names = [Path(dirs[rng.randrange(n)]).name for _ in range(args.batch)]
                measurement = generate_throughput(
                    jd_model, input_ids, args.new_tokens, args.repeats, adapter_names=names
                )
                sigma_bytes = sum(
                    layer.jd_sigma_stack[: n + 1].nbytes for layer in jd_model.base_model.jd_layers().values()
                )
                record(
                    f"JD-LoRA mixed batch, {clusters} cluster(s)",
                    n,
                    measurement,
                    distinct_in_batch=len(set(names)),
                    sigma_bytes=sigma_bytes,
                    bases_bytes=jd_model.base_model.shared_bases.nbytes(),
                    cumulative_load_s=round(load_s, 2),
                    rss_growth_mb=round(current_rss_mb() - rss_before, 1),
                )
                start = time.perf_counter()
            model = jd_model.unload()
            del jd_model
    results["lora_bytes_per_adapter"] = lora_bytes_per_adapter
    single_tps = single["tokens_per_s"]
    for run in results["runs"]:
        run["vs_single_lora"] = round(run["tokens_per_s"] / single_tps, 3)
    emit(
        results,
        [row + [f"{run['vs_single_lora']:.2f}"] for row, run in zip(rows, results["runs"])],
        ["setting", "N", "tokens/s", "requests/s", "× single LoRA"],
    )


if __name__ == "__main__":
    main()
