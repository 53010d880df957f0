"""Combines `fidelity.py` runs on the same LoRAs and test split into one report, table and plots.

Runs that differ only in how they compress (storage dtype, calibration, allocation objective, fallback, peers) are
measured against the very same base and LoRA evaluations (`--resume` reuses them), so their rows belong in one table
and one equal-bytes plot:

    python benchmarks/fidelity_merge.py run1/fidelity.json run2/fidelity.json --out-dir docs/budget_fp16

Reports of other tasks, another test split, other training settings or other LoRA results are refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fidelity_report import (
    closing_note,
    update_results,
    variant,
    write_budget_plot,
    write_markdown,
    write_plot,
)

from peft_jd.core import atomic_write_text


SAME = ("model", "tasks", "test_per_task", "train_settings", "lora_params_per_adapter")


def _row_key(row: dict) -> tuple:
    """What makes two rows the same measurement (a later report's row replaces an earlier one)."""
    return (row["method"], row["rank"], row["clusters"], row["n"], row.get("budget"), variant(row),
            row.get("sigma_dtype"), row.get("bases_dtype"))


def merge(reports: list[dict], sources: list[str]) -> dict:
    """One report with the rows of all `reports` (base and LoRA once); `sources` name them in error messages."""
    first = reports[0]
    lora_em = {name: task["lora_em"] for name, task in first["per_task"].items()}
    for report, source in zip(reports[1:], sources[1:]):
        for field in SAME:
            if report.get(field) != first.get(field):
                raise SystemExit(f"{source}: its {field} differs from {sources[0]}'s; only runs on the same LoRAs and "
                                 "test split can share a table.")
        if {name: task["lora_em"] for name, task in report["per_task"].items()} != lora_em:
            raise SystemExit(f"{source}: its LoRA evaluation differs from {sources[0]}'s (other LoRA weights or "
                             "library versions); rerun it with --resume next to the other runs.")
        if not report.get("complete", True):
            raise SystemExit(f"{source} is a partial report; let its run finish (or rerun it with --resume).")
    rows: dict[tuple, dict] = {}
    for report in reports:
        for row in report["rows"]:
            rows[_row_key(row)] = row
    skipped = {s["label"]: s for report in reports for s in report.get("skipped", [])}
    return {
        **first,
        "rows": list(rows.values()),
        "skipped": list(skipped.values()),
        "storage": None,  # per row: every row carries its own storage and compression options
        "merged_from": sources,
        "total_s": sum(report["total_s"] for report in reports),
        "complete": True,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path, help="fidelity.json files of finished runs")
    parser.add_argument("--out-dir", type=Path, required=True, help="where the merged JSON, table and plots go")
    parser.add_argument("--results-md", type=Path, default=None,
                        help="markdown page whose fidelity section is replaced")
    args = parser.parse_args(argv)
    reports = [json.loads(path.read_text(encoding="utf-8")) for path in args.reports]
    merged = merge(reports, [str(path) for path in args.reports])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_dir / "fidelity.json", json.dumps(merged, indent=2))
    table = write_markdown(merged, args.out_dir / "fidelity.md")
    plots = [write_plot(merged, args.out_dir / "fidelity.png"),
             write_budget_plot(merged, args.out_dir / "fidelity_budget.png")]
    if args.results_md:
        command = " ".join(["python benchmarks/fidelity_merge.py", *(sys.argv[1:] if argv is None else argv)])
        update_results(args.results_md, table, [p for p in plots if p], command, closing=closing_note(merged))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
