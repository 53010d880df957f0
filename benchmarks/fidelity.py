"""Quality of jointly compressed LoRAs on SmolLM2-135M-Instruct: base vs LoRA vs per-adapter SVD vs JD-Full/JD-Diag.

Trains (or loads from the cache) one rank-16 LoRA per zoo task, then evaluates every configuration on the test
splits through the mixed-batch path (each generation batch mixes many adapters): exact match, Rouge-L, agreement
with the LoRAs' own predictions, reconstruction error, parameters and bytes per adapter (bases amortized over the
collection). Writes JSON, a markdown table and plots, and prints the JSON on stdout.

    python benchmarks/fidelity.py                  # full run: 40 tasks (≈ 2 h cold, ≈ 1 h with cached LoRAs)
    python benchmarks/fidelity.py --quick          # 8 demo tasks, 2 ranks (≈ 10 min with cached demo LoRAs)
    python benchmarks/fidelity.py --smoke          # tiny random model, seconds: checks the code path only

At equal bytes per adapter: budgeted JD (ranks allocated per module, `compress --budget`) and the public peers
lorashare and vlora-dev (installed only in their own venv: `bash benchmarks/peers_env.sh`), e.g.

    python benchmarks/fidelity.py --settings jd-full:16:1 --svd-ranks 4 --subset-sizes 0 --budgets 8x 16x 32x \
        --sigma-dtype float16 --bases-dtype float16 --peers lorashare vlora
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from fidelity_peers import compress_with_peer, peers_python
from fidelity_reference import load_reference, reference_key, save_reference
from fidelity_report import (
    atomic_write_text,
    closing_note,
    update_results,
    write_budget_plot,
    write_markdown,
    write_plot,
)
from fidelity_rows import Context, Setting, fmt, lora_format_row, peer_row, row, run_setting, summary
from peer_compress import PEERS

from peft_jd.compression.sizes import REFERENCE_BYTES, STORAGE_DTYPES, Budget
from peft_jd.core import UsageError
from peft_jd.zoo import (
    BASE_ADAPTER,
    DEMO_TASKS,
    TrainSettings,
    build_requests,
    default_cache_dir,
    evaluate,
    load_lora_collection,
    load_smollm2,
    load_tiny_model,
    lora_parameters,
    make_splits,
    release,
    select_tasks,
    train_zoo,
    truncate_lora,
)
from peft_jd.zoo.train import validate


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-tasks", type=int, default=40, help="first N zoo tasks (round-robin over categories)")
    parser.add_argument("--tasks", nargs="+", default=None, help="explicit task names (overrides --num-tasks)")
    parser.add_argument("--methods", nargs="+", default=["jd-full", "jd-diag"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 24, 32, 64])
    parser.add_argument("--clusters", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--svd-ranks", type=int, nargs="+", default=[4, 8], help="per-adapter SVD baseline ranks (0: none)"
    )
    parser.add_argument(
        "--subset-sizes",
        type=int,
        nargs="+",
        default=[10, 20],
        help="also compress only the first n adapters (JD-Full, 1 cluster) to see the effect of n; 0: none",
    )
    parser.add_argument("--subset-ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument(
        "--settings",
        nargs="*",
        default=None,
        metavar="METHOD:RANK:CLUSTERS",
        help="explicit settings (e.g. jd-full:16:4 jd-diag:64:1) instead of the methods × ranks × clusters grid; "
        "given with no value: no uniform-rank rows (e.g. only --budgets)",
    )
    parser.add_argument(
        "--budgets",
        nargs="+",
        default=[],
        metavar="BUDGET",
        help="also compress at these bytes per adapter (8x: 1/8 of the LoRAs' bytes at fp16, or 150KB), ranks "
        "allocated per module (compress --budget), for each of --methods and --budget-clusters; the --peers run at "
        "the same budgets",
    )
    parser.add_argument("--budget-clusters", type=int, nargs="+", default=[1])
    parser.add_argument(
        "--sigma-dtype",
        default="float32",
        choices=sorted(STORAGE_DTYPES),
        help="storage dtype of Σ in every JD collection of the run (bytes are counted at it)",
    )
    parser.add_argument("--bases-dtype", default="float32", choices=sorted(STORAGE_DTYPES))
    parser.add_argument(
        "--calibration",
        type=int,
        default=0,
        metavar="PROMPTS_PER_TASK",
        help="compress every JD row activation-aware (compress --calibration), with the base model's input "
        "statistics on this many training prompts per task (never the validation or test splits); 0: off",
    )
    parser.add_argument(
        "--allocation-weighting",
        default="module",
        choices=["module", "energy"],
        help="objective of the budgeted rows' rank allocation (compress's allocation_weighting)",
    )
    parser.add_argument(
        "--fallback-error",
        type=float,
        default=None,
        metavar="ERR2",
        help="every JD row gives an (adapter, module) pair whose squared relative error on the shared bases exceeds "
        "ERR2 a private cluster with its own factors (compress --fallback-error), charged to the budget",
    )
    parser.add_argument(
        "--peers",
        nargs="+",
        default=[],
        choices=sorted(PEERS),
        help="public peer methods compressed at each of --budgets (run in the peers' venv)",
    )
    parser.add_argument(
        "--peers-python", type=Path, default=None, help="python of the peers' venv (default .venv-peers/bin/python)"
    )
    parser.add_argument("--test-per-task", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=None, help="override the LoRA training step cap")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None, help="LoRA cache (default ~/.cache/peft-jd/zoo)")
    parser.add_argument("--work-dir", type=Path, default=None, help="compressed collections (default: temporary)")
    parser.add_argument("--out-dir", type=Path, default=None, help="JSON/markdown/plot (default docs/)")
    parser.add_argument(
        "--results-md",
        type=Path,
        default=None,
        help="markdown file whose fidelity section is replaced (default docs/results.md)",
    )
    parser.add_argument("--quick", action="store_true", help="8 demo tasks, ranks 8/16, clusters 1/2, 20 tests/task")
    parser.add_argument("--smoke", action="store_true", help="tiny random model: code path check in seconds")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse compressed-setting rows saved by an interrupted run with the same tasks and test split "
        "(OUT_DIR/fidelity.partial.json), and the base and LoRA evaluations of any earlier run with the same "
        "tasks, test split, LoRA weights, batch size and library versions (kept in the zoo cache)",
    )
    args = parser.parse_args(argv)
    for budget in args.budgets:
        try:
            Budget.parse(budget)
        except UsageError as error:
            parser.error(f"--budgets: {error}")
    if args.peers and not args.budgets:
        parser.error("--peers compares at equal bytes: give the --budgets to compare at (e.g. 8x 16x 32x).")
    docs = Path(__file__).resolve().parent.parent / "docs"
    if args.quick or args.smoke:
        # Smaller defaults; options given explicitly on the command line are kept.
        small = {
            "tasks": list(DEMO_TASKS[: 3 if args.smoke else 8]),
            "ranks": [4, 8] if args.smoke else [8, 16],
            "clusters": [1, 2],
            "svd_ranks": [4],
            "subset_sizes": [2 if args.smoke else 4],
            "subset_ranks": [4 if args.smoke else 8],
            "test_per_task": 4 if args.smoke else 20,
        }
        for key, value in small.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
        args.out_dir = args.out_dir or Path(tempfile.gettempdir()) / "peft-jd-fidelity"
    else:
        args.out_dir = args.out_dir or docs
        args.results_md = args.results_md or docs / "results.md"
    return args


def _parse_setting(text: str, n_total: int) -> Setting:
    try:
        method, rank, clusters = text.split(":")
        return Setting(method, int(rank), int(clusters), n_total)
    except ValueError:
        raise SystemExit(f"--settings {text!r}: expected METHOD:RANK:CLUSTERS, e.g. jd-full:16:4") from None


def settings_grid(args: argparse.Namespace, n_total: int) -> list[Setting]:
    if args.settings is not None:
        grid = [_parse_setting(text, n_total) for text in args.settings]
    else:
        grid = [Setting(m, k, c, n_total) for m in args.methods for k in args.ranks for c in args.clusters]
    grid += [Setting("jd-full", k, 1, n) for n in args.subset_sizes if 0 < n < n_total for k in args.subset_ranks]
    grid += [Setting(m, None, c, n_total, b) for m in args.methods for b in args.budgets for c in args.budget_clusters]
    return grid


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Checkpoint:
    """Rows of finished compressed settings, saved after each one so an interrupted multi-hour run can resume.

    Only rows from a run with the same tasks, test split and training settings are reused; the file is written
    atomically and removed once the final report is written.
    """

    def __init__(self, path: Path, key: dict, resume: bool) -> None:
        # Through JSON once so that tuples compare equal to the lists read back.
        self.path, self.key = path, json.loads(json.dumps(key))
        self.rows: dict[str, dict] = {}
        if resume and path.exists():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("key") == self.key:
                self.rows = saved["rows"]
                log(f"resuming: {len(self.rows)} finished settings in {path}")
            else:
                log(f"not resuming from {path}: it was written for other tasks or settings")

    def reuse(self, label: str, rows: list[dict]) -> bool:
        if label not in self.rows:
            return False
        rows.append(self.rows[label])
        log(f"{label}: reused from {self.path.name}")
        return True

    def save(self, label: str, row: dict) -> None:
        self.rows[label] = row
        atomic_write_text(self.path, json.dumps({"key": self.key, "rows": self.rows}, indent=1))


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _teacher_forced(model, tokenizer, splits: dict, per_task: int, batch_size: int) -> dict[str, float]:
    """Per task, the LoRA's teacher-forced greedy exact match on the same test examples (one forward per batch).

    It must equal the generated exact match up to numerical near-ties; a gap points at a prompt or decoding mismatch.
    """
    out = {}
    for name, task_splits in splits.items():
        model.set_adapter(name)
        _, out[name] = validate(model, tokenizer, task_splits.task, task_splits.test[:per_task], batch_size)
    return out


def run(args: argparse.Namespace, publish: Callable[[dict], None] = lambda report: None) -> dict:
    """Trains or loads the LoRAs, evaluates base, LoRA and every setting; `publish` gets the report after each."""
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    zoo = load_tiny_model() if args.smoke else load_smollm2()
    log(f"model {zoo.model_id} loaded in {time.perf_counter() - start:.1f}s")
    tasks = select_tasks(args.tasks, None if args.tasks else args.num_tasks)
    settings = TrainSettings()
    if args.smoke:
        settings = TrainSettings(
            r=4, lora_alpha=8, batch_size=4, max_steps=4, eval_every=2, num_examples=40, val_examples=4
        )
    if args.max_steps:
        settings = replace(settings, max_steps=args.max_steps)
    trained = train_zoo(zoo, tasks, settings, args.cache_dir)
    loras = {name: result.path for name, result in trained.items()}
    names = list(loras)
    splits = {name: make_splits(name, settings.seed, settings.num_examples) for name in names}
    requests = build_requests(splits, per_task=args.test_per_task)
    lora_params = sum(lora_parameters(p) for p in loras.values()) / len(loras)
    # LoRAs are counted at fp16, their serving precision, as report.json and `compress --budget` count them.
    lora_bytes = REFERENCE_BYTES * lora_params
    storage = {"sigma_dtype": args.sigma_dtype, "bases_dtype": args.bases_dtype}
    if args.fallback_error is not None:
        storage["fallback_error"] = args.fallback_error
    if args.allocation_weighting != "module":
        storage["allocation_weighting"] = args.allocation_weighting
    if args.calibration:
        storage["calibration"] = str(
            calibration_statistics(zoo, tasks, splits, args.calibration, settings.target_modules)
        )
    rows: list[dict] = []
    skipped: list[dict] = []
    key = {
        "model": zoo.model_id,
        "tasks": names,
        "test_per_task": args.test_per_task,
        "train_settings": asdict(settings),
    }
    # Only a non-default storage enters the key, so that checkpoints written before it existed are still reused.
    if storage != {"sigma_dtype": "float32", "bases_dtype": "float32"}:
        key["storage"] = storage
    checkpoint = _Checkpoint(args.out_dir / "fidelity.partial.json", key, resume=args.resume)

    cache_dir = args.cache_dir or default_cache_dir()
    # Storage and calibration change only the compressed rows, so runs that differ in them share the reference.
    digest = reference_key({k: v for k, v in key.items() if k != "storage"}, loras, args.batch_size)
    reference = load_reference(cache_dir, digest) if args.resume else None
    if reference is None:
        model = load_lora_collection(zoo, loras)
        base = evaluate(model, zoo.tokenizer, requests, BASE_ADAPTER, args.batch_size, desc="base")
        lora = evaluate(model, zoo.tokenizer, requests, None, args.batch_size, desc="LoRA (mixed)")
        teacher_forced = _teacher_forced(model, zoo.tokenizer, splits, args.test_per_task, args.batch_size)
        release(zoo, model)
        save_reference(cache_dir, digest, base, lora, teacher_forced)
    else:
        base, lora, teacher_forced = reference
        log(f"base and LoRA evaluations reused from {cache_dir} (--resume)")
    base_summary, lora_summary = summary(base, lora, names), summary(lora, lora, names)
    memory = {"bytes_per_adapter": 0, "bytes_ratio": None}
    rows.append(row("base", 0, 0, len(names), 0, None, 1.0, base_summary, **memory))
    memory = {"bytes_per_adapter": lora_bytes, "bytes_ratio": 1.0}
    rows.append(row("lora", settings.r, 0, len(names), lora_params, 1.0, 0.0, lora_summary, **memory))
    log(f"base EM {base.mean():.3f}, LoRA EM {lora.mean():.3f} over {len(names)} tasks")

    def report() -> dict:
        return {
            "model": zoo.model_id,
            "tasks": names,
            "test_per_task": args.test_per_task,
            "train_settings": asdict(settings),
            "training": {
                n: {
                    "steps": r.steps,
                    "train_seconds": r.train_seconds,
                    "val_accuracy": r.val_accuracy,
                    "cached": r.cached,
                }
                for n, r in trained.items()
            },
            "lora_params_per_adapter": lora_params,
            "lora_bytes_per_adapter": lora_bytes,
            "storage": storage,
            "per_task": {
                n: {
                    "base_em": base.per_task[n]["exact_match"],
                    "lora_em": lora.per_task[n]["exact_match"],
                    "lora_rouge_l": lora.per_task[n]["rouge_l"],
                    "lora_teacher_forced_em": teacher_forced[n],
                }
                for n in names
            },
            "rows": rows,
            "skipped": skipped,
            "threads": torch.get_num_threads(),
            "total_s": time.perf_counter() - start,
        }

    def finish(label: str, new: dict) -> None:
        rows.append(new)
        checkpoint.save(label, new)
        publish(report())
        log(
            f"{label}: EM {new['exact_match']:.3f} ({_pct(new['em_retention'])} of LoRA), err² {new['err2']:.3f}, "
            f"{new['memory_ratio']:.1f}× fewer parameters, {fmt(new['bytes_ratio'], '.1f')}× fewer bytes, "
            f"agreement {new['agreement']:.1%}"
        )

    publish(report())
    with tempfile.TemporaryDirectory(prefix="peft-jd-fidelity-") as scratch:
        work = Path(args.work_dir or scratch)
        ctx = Context(zoo, loras, requests, lora, work, args.batch_size, lora_params, storage)
        for rank in (r for r in args.svd_ranks if r > 0):
            label = f"svd-r{rank}"
            if not checkpoint.reuse(label, rows):
                svd = {n: truncate_lora(p, ctx.work / label / n, rank) for n, p in loras.items()}
                finish(label, lora_format_row(ctx, "svd", rank, label, svd))
        for setting in settings_grid(args, len(names)):
            if checkpoint.reuse(setting.label, rows):
                continue
            try:
                finish(setting.label, run_setting(zoo, setting, ctx))
            except UsageError as error:  # e.g. a budget below the smallest collection: the other rows still run
                skipped.append({"label": setting.label, "reason": str(error)})
                log(f"{setting.label}: skipped, {error}")
        # The peers at the same bytes per adapter as the budgeted rows, run in their own venv.
        python, missing = peers_python(args.peers_python) if args.peers else (None, None)
        for budget in args.budgets:
            budget_bytes = Budget.parse(budget).resolve(lora_bytes)
            for method in args.peers:
                label = f"{method}-b{budget}-n{len(names)}"
                if checkpoint.reuse(label, rows):
                    continue
                result = python and compress_with_peer(python, method, loras, budget_bytes, work / label, args.threads)
                reason = result.reason if result else missing
                if reason:
                    skipped.append({"label": label, "reason": reason})
                    log(f"{label}: skipped, {reason}")
                else:
                    finish(label, peer_row(ctx, method, budget, label, result.adapters, result.report))

    return report()


def calibration_statistics(zoo, tasks, splits: dict, per_task: int, target_modules) -> Path:
    """Input statistics of the base model on `per_task` training examples of every task (prompt and answer, as the
    LoRAs were trained on them), saved to a temporary file for `compress --calibration`."""
    from peft_jd.compression.calibration import collect_input_statistics
    from peft_jd.zoo.batching import make_batch

    batches = []
    for task in tasks:
        batch = make_batch(zoo.tokenizer, task, splits[task.name].train[:per_task])
        batches.append(
            {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
        )
    statistics = collect_input_statistics(zoo.model, batches, target_modules, model_name=zoo.model_id)
    path = Path(tempfile.mkdtemp(prefix="peft-jd-calibration-")) / "calibration.safetensors"
    log(f"calibration: input statistics of {len(statistics.groups)} modules on {statistics.tokens:,} tokens")
    return statistics.save(path)


def write_outputs(report: dict, args: argparse.Namespace, argv=None) -> None:
    """JSON, markdown table, plots and the results page section for `report` (complete or so far)."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_dir / "fidelity.json", json.dumps(report, indent=2))
    table = write_markdown(report, args.out_dir / "fidelity.md")
    plot = write_plot(report, args.out_dir / "fidelity.png")
    budget_plot = write_budget_plot(report, args.out_dir / "fidelity_budget.png")
    if args.results_md:
        command = " ".join(["python benchmarks/fidelity.py", *(sys.argv[1:] if argv is None else argv)])
        plots = [path for path in (plot, budget_plot) if path is not None]
        update_results(args.results_md, table, plots, command, closing=closing_note(report))


def main(argv=None) -> int:
    args = parse_args(argv)
    # The outputs are rewritten after every setting (marked as partial) so a long run shows results as it goes.
    report = run(args, publish=lambda partial: write_outputs({**partial, "complete": False}, args, argv))
    write_outputs({**report, "complete": True}, args, argv)
    (args.out_dir / "fidelity.partial.json").unlink(missing_ok=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
