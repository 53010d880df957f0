"""`peft-jd compress`, `peft-jd add`, `peft-jd inspect`."""

from __future__ import annotations

import argparse
import json
import sys

from ..core import BASES_WEIGHTS_NAME, bases_dir
from .engine import compress as run_compress
from .incremental import extend_collection
from .report import CompressionReport


def _hub_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Hugging Face Hub (for adapters given as repo ids)")
    group.add_argument("--revision", default=None, help="default revision (a spec's own @revision wins)")
    group.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    group.add_argument("--cache-dir", default=None, help="Hub cache folder")
    group.add_argument("--local-files-only", action="store_true", help="never download; use the cache only")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `compress`, `add` and `inspect` subcommands."""
    compress = subparsers.add_parser(
        "compress",
        help="compress many LoRA adapters into shared bases + per-adapter Σ",
        description="Compress PEFT LoRA adapters (folders, Hub ids, or text files listing them) into a JD-LoRA "
        "collection: OUT/bases, OUT/adapters/<name>, OUT/report.json. OUT is replaced as a whole, atomically, only "
        "if it is a peft-jd collection (or with --overwrite); other writers of OUT wait. Rerunning an interrupted "
        "command resumes.",
    )
    compress.add_argument("--adapters", nargs="+", required=True, metavar="ADAPTER",
                          help="LoRA folder, Hub repo id (owner/name[/subfolder][@revision]), NAME=SOURCE, or a "
                          "text file with one per line")
    compress.add_argument("--out", required=True, help="output collection folder")
    compress.add_argument("--overwrite", action="store_true",
                          help="replace OUT even if it is not a peft-jd collection, or if it holds adapters added "
                          "with `peft-jd add` that are not among --adapters (they are dropped)")
    compress.add_argument("--method", choices=("jd-full", "jd-diag", "svd"), default="jd-full",
                          help="jd-full: full k×k Σ (default); jd-diag: diagonal Σ; svd: per-adapter baseline")
    compress.add_argument("--rank", type=int, default=None,
                          help="rank k of the bases (default 16); with --budget, the largest rank of a module")
    compress.add_argument("--budget", default=None,
                          help="memory per adapter instead of one rank: a ratio to the LoRAs at fp16 ('16x') or "
                          "bytes ('200000', '150KB'); ranks are then allocated per module to minimise the error")
    compress.add_argument("--clusters", type=int, default=None, help="clusters per module (default 1)")
    compress.add_argument("--target-error", type=float, default=None,
                          help="choose rank/clusters so the mean (‖ΔW−ΔŴ‖/‖ΔW‖)² on probe modules is at most this")
    compress.add_argument("--probe-modules", type=int, default=3, help="modules probed by --target-error")
    compress.add_argument("--rank-allocation", choices=("uniform", "per-module"), default="uniform",
                          help="with --target-error: per-module allocates ranks like --budget, for the fewest bytes "
                          "whose mean error over all modules meets the target")
    compress.add_argument("--allocation-weighting", choices=("module", "energy"), default="module",
                          help="with --budget/per-module: minimise the mean of the modules' relative errors "
                          "(module) or every adapter's relative error over all its modules (energy)")
    compress.add_argument("--no-normalize", dest="normalize", action="store_false",
                          help="weight adapters by their norm instead of equally")
    compress.add_argument("--seed", type=int, default=0)
    compress.add_argument("--tol", type=float, default=1e-3, help="relative error decrease that stops a solve")
    compress.add_argument("--max-iter", type=int, default=100)
    compress.add_argument("--max-rounds", type=int, default=3, help="cluster reassignment rounds")
    compress.add_argument("--bases-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    compress.add_argument("--fallback-error", type=float, default=None,
                          help="adapters whose err² on a module's shared bases exceeds this keep their own factors "
                          "there (a private cluster, same collection and mixed batch); charged to --budget")
    compress.add_argument("--calibration", default=None,
                          help="input statistics from `peft-jd calibrate`: minimise the error on the base model's "
                          "inputs instead of the plain Frobenius error")
    compress.add_argument("--calibration-damping", type=float, default=0.01,
                          help="ridge added to each input second moment, relative to its mean diagonal")
    compress.add_argument("--sigma-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                          help="storage dtype of the per-adapter Σ")
    compress.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an interrupted run")
    compress.add_argument("--quiet", action="store_true", help="no progress bars")
    _hub_arguments(compress)
    compress.set_defaults(func=_run_compress)

    add = subparsers.add_parser(
        "add",
        help="project new LoRAs onto an existing collection's bases",
        description="Write sigma adapters for new LoRAs on the existing bases (best cluster per module); existing "
        "adapters and bases stay untouched. The adapters and report.json change together, atomically.",
    )
    add.add_argument("collection", help="collection folder written by `peft-jd compress`")
    add.add_argument("adapters", nargs="+", metavar="ADAPTER", help="new LoRAs (same forms as for compress)")
    add.add_argument("--warn-error", type=float, default=0.6,
                     help="warn when an adapter's mean err² exceeds this (default 0.6)")
    add.add_argument("--overwrite", action="store_true", help="replace adapters of the same name")
    add.add_argument("--quiet", action="store_true", help="no progress bars")
    _hub_arguments(add)
    add.set_defaults(func=_run_add)

    calibrate = subparsers.add_parser(
        "calibrate",
        help="collect the base model's input statistics for activation-aware compression (--calibration)",
        description="Run the base model on calibration texts and save, per target module, the mean of x xᵀ over "
        "their tokens. `peft-jd compress --calibration FILE` then minimises the error on these inputs.",
    )
    calibrate.add_argument("--model", required=True, help="base model folder or Hub id (the LoRAs' base model)")
    calibrate.add_argument("--gguf-file", default=None, help="GGUF file inside --model, if the model is a GGUF")
    calibrate.add_argument("--texts", required=True,
                           help="text file, one calibration prompt per line (generic prompts, or the tasks' own "
                           "training prompts)")
    calibrate.add_argument("--target-modules", nargs="+", required=True, help="module suffixes, as the LoRAs'")
    calibrate.add_argument("--out", required=True, help="output .safetensors file")
    calibrate.add_argument("--max-length", type=int, default=256, help="tokens per text (truncated beyond)")
    calibrate.add_argument("--batch-size", type=int, default=8)
    calibrate.add_argument("--chat-template", action="store_true",
                           help="wrap every text as a user turn with the tokenizer's chat template")
    calibrate.set_defaults(func=_run_calibrate)

    inspect = subparsers.add_parser("inspect", help="show a collection: adapters, clusters, errors, sizes",
                                    description="Summarise a collection written by `peft-jd compress`.")
    inspect.add_argument("collection", help="collection folder")
    inspect.add_argument("--modules", action="store_true", help="also show the per-module table")
    inspect.add_argument("--limit", type=int, default=30, help="rows per table (0: all)")
    inspect.add_argument("--sort", choices=("name", "err"), default="err", help="adapter order (default: worst first)")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    inspect.set_defaults(func=_run_inspect)


def _run_compress(args: argparse.Namespace) -> int:
    report = run_compress(
        args.adapters, args.out, method=args.method, rank=args.rank, clusters=args.clusters,
        target_error=args.target_error, normalize=args.normalize, seed=args.seed, tol=args.tol,
        max_iter=args.max_iter, max_rounds=args.max_rounds, bases_dtype=args.bases_dtype, revision=args.revision,
        token=args.token, cache_dir=args.cache_dir, local_files_only=args.local_files_only, resume=args.resume,
        progress=not args.quiet, probe_modules=args.probe_modules, overwrite=args.overwrite, budget=args.budget,
        sigma_dtype=args.sigma_dtype, rank_allocation=args.rank_allocation, fallback_error=args.fallback_error,
        calibration=args.calibration, calibration_damping=args.calibration_damping,
        allocation_weighting=args.allocation_weighting,
    )
    print(report.summary())
    print(f"wrote {args.out}")
    return 0


def _run_add(args: argparse.Namespace) -> int:
    report = extend_collection(
        args.collection, args.adapters, warn_error=args.warn_error, overwrite=args.overwrite,
        revision=args.revision, token=args.token, cache_dir=args.cache_dir, local_files_only=args.local_files_only,
        progress=not args.quiet,
    )
    added = [name for name, entry in report.adapters.items() if entry.get("added")]
    print(f"{len(added)} adapter(s) now added to {args.collection}; collection: {report.summary()}")
    return 0


def _run_calibrate(args: argparse.Namespace) -> int:
    from .calibration_run import calibrate_from_texts

    with open(args.texts, encoding="utf-8") as handle:
        texts = [line.strip() for line in handle if line.strip()]
    statistics = calibrate_from_texts(args.model, texts, args.target_modules, gguf_file=args.gguf_file,
                                      max_length=args.max_length, batch_size=args.batch_size,
                                      chat_template=args.chat_template)
    statistics.save(args.out)
    print(f"wrote input statistics of {len(statistics.groups)} modules ({statistics.tokens:,} tokens) to {args.out}")
    return 0


def _cluster_text(cluster) -> str:
    if isinstance(cluster, int):
        return str(cluster)
    ids = sorted(set(cluster.values()))
    return f"per module ({len(ids)} distinct)"


def _run_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    report = CompressionReport.load(args.collection)
    bases_file = bases_dir(args.collection) / BASES_WEIGHTS_NAME
    bases_bytes = bases_file.stat().st_size if bases_file.is_file() else 0
    if args.json:
        data = {key: report.data[key] for key in ("settings", "summary", "sizes", "timings", "num_adapters",
                                                  "num_modules", "auto_selection", "warnings") if key in report.data}
        data["bases_bytes"] = bases_bytes
        print(json.dumps(data, indent=1))
        return 0
    # Piped output (files, CI logs) should not be cut to 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 200)
    s, sizes = report.data["settings"], report.sizes
    console.print(f"[bold]{args.collection}[/bold]: {report.data.get('base_model_name_or_path')} · "
                  f"{', '.join(report.data['target_modules'])}")
    console.print(report.summary())
    console.print(f"bases file {bases_bytes / 2**20:.1f} MiB · Σ {sizes['sigma_params_per_module']:.4g} values per "
                  f"module per adapter · settings {json.dumps(s)}")
    if "bytes" in sizes:
        memory = sizes["bytes"]
        console.print(f"bytes per adapter {memory['bytes_per_adapter']:,.0f} (bases amortised) vs "
                      f"{memory['lora_bytes_per_adapter']:,.0f} for a LoRA at fp16: {memory['memory_ratio']:.1f}× "
                      "less")
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    limit = None if args.limit == 0 else args.limit
    table = Table(title="adapters")
    for column in ("name", "cluster", "mean err²", "max err²", "mean err", "LoRA params", "Σ params", "added"):
        table.add_column(column, justify="left" if column in ("name", "cluster") else "right")
    items = list(report.adapters.items())
    items.sort(key=(lambda kv: -kv[1]["mean_err2"]) if args.sort == "err" else (lambda kv: kv[0]))
    for name, entry in items[:limit]:
        table.add_row(name, _cluster_text(entry["cluster"]), f"{entry['mean_err2']:.4f}", f"{entry['max_err2']:.4f}",
                      f"{entry['mean_err']:.4f}", f"{entry['lora_params']:,}", f"{entry['sigma_params']:,}",
                      "yes" if entry.get("added") else "")
    console.print(table)
    if limit is not None and len(items) > limit:
        console.print(f"… {len(items) - limit} more (--limit 0 shows all)")
    if args.modules:
        modules = Table(title="modules")
        for column in ("module", "in→out", "rank", "clusters", "sizes min/max", "mean err²", "iterations",
                       "read s", "compress s"):
            modules.add_column(column, justify="left" if column == "module" else "right")
        for key, module in list(report.modules.items())[:limit]:
            cluster_sizes = module.get("cluster_sizes") or [0]
            modules.add_row(key, f"{module['in_features']}→{module['out_features']}",
                            str(module.get("rank", s["rank"])), str(module["num_clusters"]),
                            f"{min(cluster_sizes)}/{max(cluster_sizes)}", f"{module['mean_err2']:.4f}",
                            str(module.get("iterations", "")), f"{module.get('seconds_read', 0):.2f}",
                            f"{module.get('seconds_compress', 0):.2f}")
        console.print(modules)
    return 0
