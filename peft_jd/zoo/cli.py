"""`peft-jd demo` subcommand."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from .tasks import DEMO_TASKS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `demo` subcommand to the `peft-jd` command line."""
    parser = subparsers.add_parser(
        "demo",
        help="train/load a small LoRA zoo on SmolLM2-135M, compress it jointly and serve one mixed batch",
        description="Trains (or loads from the cache) one LoRA per task on SmolLM2-135M-Instruct, compresses them "
        "into one JD-LoRA collection, evaluates base / LoRA / JD on the test splits with mixed batches, and compares "
        "the throughput of one mixed JD batch with a single LoRA.",
    )
    parser.add_argument("--tasks", nargs="+", default=list(DEMO_TASKS), help="zoo task names")
    parser.add_argument("--method", default="jd-full", choices=["jd-full", "jd-diag"], help="compression method")
    parser.add_argument("--rank", type=int, default=16, help="rank of the shared bases")
    parser.add_argument("--clusters", type=int, default=1, help="number of clusters")
    parser.add_argument("--test-per-task", type=int, default=8, help="test examples per task")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per mixed generation batch")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on LoRA training steps per task")
    parser.add_argument("--cache-dir", type=Path, default=None, help="adapter cache (default ~/.cache/peft-jd/zoo)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the compressed collection here")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny random model instead of SmolLM2 (code path check)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from .demo import DemoOptions, run_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    options = DemoOptions(
        tasks=args.tasks,
        method=args.method,
        rank=args.rank,
        clusters=args.clusters,
        test_per_task=args.test_per_task,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        work_dir=args.work_dir,
        smoke=args.smoke,
    )
    if args.max_steps is not None:
        options = replace(options, train=replace(options.train, max_steps=args.max_steps))
    console = Console()
    try:
        report = run_demo(options, console=console)
    except ImportError as exc:
        # Missing optional dependencies (gguf, the compression engine): say what to install instead of a traceback.
        console.print(f"[red]error:[/red] {exc}")
        return 1
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0
