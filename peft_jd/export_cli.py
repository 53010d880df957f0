"""`peft-jd export-lora`: write a JD-LoRA adapter as a plain PEFT LoRA that any LoRA server can load."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-lora",
        help="export a JD-LoRA sigma adapter as an exact plain PEFT LoRA",
        description="Rewrites a sigma adapter (plus its shared bases) as a rank-r PEFT LoRA: B' = U Σ, A' = Vᵀ.",
    )
    parser.add_argument("adapter", help="sigma adapter directory or Hub repo id")
    parser.add_argument("out", help="output directory for the PEFT LoRA")
    parser.add_argument("--revision", default=None, help="Hub revision of the adapter")
    parser.add_argument("--subfolder", default=None, help="folder of the adapter inside a collection repo")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .export import export_adapter_to_lora

    export = export_adapter_to_lora(args.adapter, revision=args.revision, subfolder=args.subfolder)
    export.save_pretrained(args.out)
    print(f"wrote PEFT LoRA (r={export.config.r}, {len(export.state_dict) // 2} modules) to {args.out}")
    return 0
