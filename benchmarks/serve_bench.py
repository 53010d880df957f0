"""Mixed-batch generation throughput on SmolLM2-135M-Instruct: base, one LoRA, PEFT multi-LoRA, JD-LoRA.

B requests (prompt 64 tokens, 16 new tokens, greedy) with adapters drawn uniformly from a collection of N. Every
setting is resident at once (three copies of the base model) and the settings are timed in interleaved rounds, so
that a slow moment of the machine hits all of them alike; each setting reports its median over the rounds.

    python benchmarks/serve_bench.py                      # full run (~10 minutes on 2 cores)
    python benchmarks/serve_bench.py --quick              # N ∈ {1, 8}, B = 8, 4 clusters
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import TARGETS, current_rss_mb, emit, load_model, write_synthetic_collection
from peft import LoraConfig, PeftModel, get_peft_model

import peft_jd


def add_peft_loras(model, count: int, rank: int) -> PeftModel:
    """A PEFT model with `count` random rank-r q/k/v LoRAs (alpha 2r), created in memory."""
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, config, adapter_name="lora-0")
    for i in range(1, count):
        peft_model.add_adapter(f"lora-{i}", config)
    return peft_model.eval()


def lora_bytes(peft_model) -> int:
    return sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if "lora_" in n)


def load_jd_collection(tmp: Path, count: int, rank: int, clusters: int) -> tuple[PeftModel, list[str], dict]:
    """A fresh base model with `count` synthetic JD adapters bulk-loaded; returns the model, names and load figures."""
    model = load_model()
    dirs = write_synthetic_collection(tmp, model, count, r=rank, clusters=clusters)
    rss_before = current_rss_mb()
    start = time.perf_counter()
    jd_model = PeftModel.from_pretrained(model, dirs[0], adapter_name=Path(dirs[0]).name)
    peft_jd.load_adapters(jd_model, dirs[1:], progress=False)
    layers = jd_model.base_model.jd_layers().values()
    figures = {
        "load_s": round(time.perf_counter() - start, 2),
        "rss_growth_mb": round(current_rss_mb() - rss_before, 1),
        "sigma_bytes": sum(layer.jd_sigma_stack[: count + 1].nbytes for layer in layers),
        "bases_bytes": jd_model.base_model.shared_bases.nbytes(),
    }
    return jd_model.eval(), [Path(d).name for d in dirs], figures


def draw(rng: random.Random, n: int, batch: int) -> list[int]:
    return [rng.randrange(n) for _ in range(batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 8, 100, 1000])
    parser.add_argument("--clusters", type=int, nargs="+", default=[1, 25])
    parser.add_argument("--peft-max", type=int, default=100,
                        help="most PEFT LoRAs held in memory; larger N reuse them (cost depends on distinct rows)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.counts, args.clusters, args.peft_max, args.rounds = 8, [1, 8], [1, 4], 8, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    input_ids = torch.randint(100, 40000, (args.batch, args.prompt_tokens))
    mask = torch.ones_like(input_ids)
    gen_kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    loaded = min(max(args.counts), max(args.peft_max, args.batch))
    peft_model = add_peft_loras(load_model(), loaded, args.rank)
    lora_bytes_per_adapter = lora_bytes(peft_model) // loaded
    # setting name → (model, adapter_names or None, extra fields); every model stays resident.
    settings: dict[str, tuple] = {
        "base model": (peft_model, None, {"n_adapters": 0}),
        "single LoRA (PEFT, unmerged)": (peft_model, None, {"n_adapters": 1}),
    }
    for n in sorted(args.counts):
        # PEFT's cost depends on which rows share an adapter, not on how many are loaded: draw from N, relabel the
        # distinct draws onto the loaded LoRAs.
        draws = draw(rng, n, args.batch)
        relabel = {index: f"lora-{i}" for i, index in enumerate(dict.fromkeys(draws))}
        settings[f"PEFT LoRA mixed batch, N={n}"] = (
            peft_model, [relabel[i] for i in draws],
            {"n_adapters": n, "distinct_in_batch": len(relabel), "adapter_bytes_at_n": lora_bytes_per_adapter * n},
        )
    with tempfile.TemporaryDirectory() as tmp:
        for clusters in args.clusters:
            jd_model, names, figures = load_jd_collection(Path(tmp) / f"c{clusters}", max(args.counts), args.rank,
                                                          clusters)
            for n in sorted(args.counts):
                rows = [names[i] for i in draw(rng, n, args.batch)]
                settings[f"JD-LoRA mixed batch, {clusters} cluster(s), N={n}"] = (
                    jd_model, rows, {"n_adapters": n, "distinct_in_batch": len(set(rows)), **figures})

    timings: dict[str, list[float]] = {name: [] for name in settings}
    with torch.inference_mode():
        for model, rows, _ in settings.values():  # warm-up
            kwargs = {"adapter_names": rows[:2]} if rows else {}
            model.generate(input_ids=input_ids[:2], attention_mask=mask[:2], **gen_kwargs, **kwargs)
        for _ in range(args.rounds):
            for name, (model, rows, _) in settings.items():
                kwargs = {"adapter_names": rows} if rows else {}
                start = time.perf_counter()
                if name == "base model":
                    with model.disable_adapter():
                        model.generate(input_ids=input_ids, attention_mask=mask, **gen_kwargs)
                else:
                    model.generate(input_ids=input_ids, attention_mask=mask, **gen_kwargs, **kwargs)
                timings[name].append(time.perf_counter() - start)

    produced = args.batch * args.new_tokens
    single = statistics.median(timings["single LoRA (PEFT, unmerged)"])
    results = {"config": vars(args), "lora_bytes_per_adapter": lora_bytes_per_adapter, "runs": []}
    table = []
    for name, (_, _, extra) in settings.items():
        seconds = statistics.median(timings[name])
        run = {"setting": name, **extra, "seconds_median": round(seconds, 3),
               "seconds_all": [round(t, 3) for t in timings[name]], "tokens_per_s": round(produced / seconds, 2),
               "requests_per_s": round(args.batch / seconds, 3), "vs_single_lora": round(single / seconds, 3)}
        results["runs"].append(run)
        table.append([name, str(extra.get("distinct_in_batch", "-")), f"{run['tokens_per_s']:.1f}",
                      f"{run['requests_per_s']:.2f}", f"{run['vs_single_lora']:.3f}"])
    emit(results, table, ["setting", "distinct", "tokens/s", "requests/s", "× single LoRA"])


if __name__ == "__main__":
    main()
