"""`peft-jd export-lora`: write a JD-LoRA adapter as a plain PEFT LoRA that any LoRA server can load."""

from __future__ import annotations

import argparse
import sys

from .core import KIND_LORA_EXPORT, DestinationError, check_replaceable
from .export import check_export_destination, export_adapter_to_lora


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-lora",
        help="export a JD-LoRA sigma adapter as an exact plain PEFT LoRA",
        description=(
            "Rewrites a sigma adapter (plus its shared bases) as a rank-r PEFT LoRA: B' = U Σ, A' = Vᵀ. OUT is "
            "replaced only if it is empty or an earlier export-lora output, or with --overwrite; a collection, a "
            "sigma adapter or bases folder is never replaced."
        ),
    )
    parser.add_argument("adapter", help="sigma adapter directory or Hub repo id")
    parser.add_argument("out", help="output directory for the PEFT LoRA")
    parser.add_argument("--revision", default=None, help="Hub revision of the adapter")
    parser.add_argument("--subfolder", default=None, help="folder of the adapter inside a collection repo")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT even if it holds files that are not an earlier export-lora output",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        # Refused destinations are usage errors (exit 2), found before any adapter or bases file is read.
        check_export_destination(args.out)
        check_replaceable(args.out, KIND_LORA_EXPORT, args.overwrite)
        export = export_adapter_to_lora(args.adapter, revision=args.revision, subfolder=args.subfolder)
        export.save_pretrained(args.out, overwrite=args.overwrite)
    except DestinationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    modules = sum(key.endswith(".lora_A.weight") for key in export.state_dict)
    print(f"wrote PEFT LoRA (r={export.config.r}, {modules} modules) to {args.out}")
    return 0
