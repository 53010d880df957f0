"""`peft-jd demo`: train (or load) a small LoRA zoo, compress it jointly, serve one mixed batch, print the results.

Steps: load SmolLM2-135M-Instruct → train or load one LoRA per task (cached) → compress them into one JD-LoRA
collection → evaluate base model, LoRAs and JD-LoRA on the test splits with mixed batches → time one mixed JD batch
against the same batch on a single LoRA.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .collection import (
    compress_collection,
    jd_parameters,
    load_jd_collection,
    load_lora_collection,
    lora_parameters,
    reconstruction_errors,
    release,
)
from .evaluate import BASE_ADAPTER, build_requests, evaluate, measure_throughput
from .model import ZooModel, load_smollm2, load_tiny_model
from .tasks import DEMO_TASKS, make_splits, select_tasks
from .train import TrainSettings, train_zoo


# The zoo's default settings, so the benchmark reuses the demo's cached adapters (and vice versa).
DEMO_TRAIN_SETTINGS = TrainSettings()
SMOKE_TRAIN_SETTINGS = TrainSettings(
    r=4, lora_alpha=8, batch_size=4, max_steps=4, eval_every=2, num_examples=40, val_examples=4
)


@dataclass
class DemoOptions:
    """Settings of `peft-jd demo`.

    Args:
        tasks: Task names (default: `DEMO_TASKS`).
        method: Compression method (`"jd-full"`, `"jd-diag"`).
        rank: Rank of the shared bases.
        clusters: Number of clusters.
        test_per_task: Test examples evaluated per task.
        batch_size: Rows per mixed generation batch.
        throughput_batch: Rows of the batch timed for the throughput comparison.
        train: LoRA training settings.
        cache_dir: Adapter cache (default `~/.cache/peft-jd/zoo`).
        work_dir: Where the compressed collection is written (default: a temporary directory).
        smoke: Use a tiny random model with a character tokenizer instead of SmolLM2 (seconds, no real numbers).
    """

    tasks: Sequence[str] = DEMO_TASKS
    method: str = "jd-full"
    rank: int = 16
    clusters: int = 1
    test_per_task: int = 8
    batch_size: int = 64
    throughput_batch: int = 32
    train: TrainSettings = field(default_factory=lambda: DEMO_TRAIN_SETTINGS)
    cache_dir: Path | None = None
    work_dir: Path | None = None
    smoke: bool = False


def _load_model(options: DemoOptions) -> ZooModel:
    return load_tiny_model() if options.smoke else load_smollm2()


def _stage(console, text: str):
    """A spinner while a step without its own progress bar runs (nothing when silent)."""
    return console.status(text) if console is not None else contextlib.nullcontext()


def run_demo(options: DemoOptions | None = None, console=None, compressor: Callable = compress_collection) -> dict:
    """Runs the demo and returns its report (also printed to `console` if given).

    Args:
        options: Demo settings.
        console: A `rich.console.Console` for progress and the result table; `None` runs silently.
        compressor: `compressor(loras, out_dir, method, rank, clusters)` writes the JD collection; defaults to
            `peft_jd.compression.compress`.
    """
    options = options or DemoOptions()
    if options.smoke and options.train == DEMO_TRAIN_SETTINGS:
        options = replace(options, train=SMOKE_TRAIN_SETTINGS)
    say = console.log if console is not None else (lambda *a, **k: None)
    progress = console is not None
    timings: dict[str, float] = {}

    start = time.perf_counter()
    with _stage(console, "loading the base model"):
        zoo = _load_model(options)
    timings["load_model_s"] = time.perf_counter() - start
    say(f"base model {zoo.model_id} loaded in {timings['load_model_s']:.1f}s")

    tasks = select_tasks(options.tasks)
    start = time.perf_counter()
    trained = train_zoo(zoo, tasks, options.train, options.cache_dir, progress=progress)
    timings["train_or_load_s"] = time.perf_counter() - start
    for result in trained.values():
        origin = "cache" if result.cached else "trained"
        say(
            f"LoRA {result.task:<18} {origin:<7} {result.steps:>3} steps, {result.train_seconds:6.1f}s, "
            f"val EM {result.val_accuracy:.2f}"
        )
    loras = {name: result.path for name, result in trained.items()}

    with tempfile.TemporaryDirectory(prefix="peft-jd-demo-") as scratch:
        out_dir = Path(options.work_dir or scratch) / f"{options.method}-r{options.rank}-c{options.clusters}"
        start = time.perf_counter()
        # The compression engine shows its own progress bar.
        compressor(loras, out_dir, options.method, options.rank, options.clusters)
        timings["compress_s"] = time.perf_counter() - start
        say(
            f"compressed {len(loras)} LoRAs with {options.method} (rank {options.rank}, {options.clusters} "
            f"cluster(s)) in {timings['compress_s']:.1f}s"
        )
        report = _evaluate_all(zoo, loras, out_dir, options, timings, progress)
    report["timings"] = timings
    report["training"] = {
        name: {"cached": r.cached, "steps": r.steps, "train_seconds": r.train_seconds, "val_accuracy": r.val_accuracy}
        for name, r in trained.items()
    }
    report["options"] = {
        "tasks": list(options.tasks),
        "method": options.method,
        "rank": options.rank,
        "clusters": options.clusters,
        "test_per_task": options.test_per_task,
        "model": zoo.model_id,
    }
    if console is not None:
        render(report, console)
    return report


def _evaluate_all(
    zoo: ZooModel,
    loras: dict[str, Path],
    out_dir: Path,
    options: DemoOptions,
    timings: dict[str, float],
    progress: bool,
) -> dict:
    splits = {name: make_splits(name, options.train.seed, options.train.num_examples) for name in loras}
    requests = build_requests(splits, per_task=options.test_per_task)
    batch = requests[: options.throughput_batch]
    batch_names = [r.task for r in batch]
    start = time.perf_counter()

    model = load_lora_collection(zoo, loras)
    base = evaluate(
        model, zoo.tokenizer, requests, BASE_ADAPTER, options.batch_size, progress=progress, desc="base model"
    )
    lora = evaluate(model, zoo.tokenizer, requests, None, options.batch_size, progress=progress, desc="LoRAs (mixed)")
    model.set_adapter(batch_names[0])
    single_lora_tps = measure_throughput(model, zoo.tokenizer, [r.message for r in batch], None)
    lora_mixed_tps = measure_throughput(model, zoo.tokenizer, [r.message for r in batch], batch_names)
    release(zoo, model)

    model = load_jd_collection(zoo, out_dir, list(loras), progress=progress)
    jd = evaluate(model, zoo.tokenizer, requests, None, options.batch_size, progress=progress, desc="JD (mixed)")
    jd_mixed_tps = measure_throughput(model, zoo.tokenizer, [r.message for r in batch], batch_names)
    release(zoo, model)
    timings["evaluate_s"] = time.perf_counter() - start

    params = jd_parameters(out_dir, list(loras))
    lora_params = sum(lora_parameters(p) for p in loras.values()) / len(loras)
    errors = reconstruction_errors(loras, out_dir)
    per_task = {
        name: {
            "base_em": base.per_task[name]["exact_match"],
            "lora_em": lora.per_task[name]["exact_match"],
            "jd_em": jd.per_task[name]["exact_match"],
            "jd_rouge_l": jd.per_task[name]["rouge_l"],
            "lora_rouge_l": lora.per_task[name]["rouge_l"],
            "agreement": _agreement(requests, lora.predictions, jd.predictions, name),
            "reconstruction_err2": errors[name],
            "n": lora.per_task[name]["n"],
        }
        for name in loras
    }
    return {
        "per_task": per_task,
        "mean": {
            key: sum(t[key] for t in per_task.values()) / len(per_task)
            for key in next(iter(per_task.values()))
            if key != "n"
        },
        "parameters": {
            "lora_per_adapter": lora_params,
            "jd_sigma_per_adapter": params["sigma"],
            "jd_bases": params["bases"],
            "jd_per_adapter_amortized": params["amortized"],
            "compression_ratio": lora_params / params["amortized"],
        },
        "throughput_tokens_per_s": {
            "single_lora": single_lora_tps,
            "lora_mixed": lora_mixed_tps,
            "jd_mixed": jd_mixed_tps,
            "batch_size": len(batch),
            "adapters_in_batch": len(set(batch_names)),
        },
        "threads": torch.get_num_threads(),
    }


def _agreement(requests, first: Sequence[str], second: Sequence[str], task: str) -> float:
    pairs = [(a, b) for r, a, b in zip(requests, first, second) if r.task == task]
    return sum(a == b for a, b in pairs) / max(1, len(pairs))


def render(report: dict, console) -> None:
    """Prints the per-task table and the memory/throughput summary of a demo report with rich."""
    from rich.table import Table

    options = report["options"]
    table = Table(
        title=f"{len(report['per_task'])} LoRAs on {options['model']}: exact match on the test splits "
        f"({min(t['n'] for t in report['per_task'].values())} per task)"
    )
    for column in ("task", "base", "LoRA", options["method"], "JD = LoRA", "err²"):
        table.add_column(column, justify="left" if column == "task" else "right")
    rows = list(report["per_task"].items()) + [("mean", report["mean"])]
    for name, m in rows:
        table.add_row(
            name,
            f"{m['base_em']:.0%}",
            f"{m['lora_em']:.0%}",
            f"{m['jd_em']:.0%}",
            f"{m['agreement']:.0%}",
            f"{m['reconstruction_err2']:.2f}",
            end_section=name == rows[-2][0],
        )
    console.print(table)
    p, t = report["parameters"], report["throughput_tokens_per_s"]
    n = len(report["per_task"])
    console.print(
        f"memory: {n} LoRAs × {p['lora_per_adapter'] / 1e6:.2f}M params → shared bases {p['jd_bases'] / 1e6:.2f}M + "
        f"Σ {p['jd_sigma_per_adapter'] / 1e3:.1f}k per adapter = {p['jd_per_adapter_amortized'] / 1e3:.0f}k per "
        f"adapter amortized: [bold]{p['compression_ratio']:.1f}× smaller[/bold] (grows with the number of adapters)"
    )
    console.print(
        f"throughput, one batch of {t['batch_size']} requests using {t['adapters_in_batch']} adapters: "
        f"JD mixed {t['jd_mixed']:.0f} tok/s vs single LoRA {t['single_lora']:.0f} tok/s "
        f"([bold]{t['jd_mixed'] / t['single_lora']:.2f}×[/bold]); PEFT LoRA mixed {t['lora_mixed']:.0f} tok/s"
    )
    timings = report["timings"]
    console.print(
        "time: " + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f}s" for k, v in timings.items())
    )
