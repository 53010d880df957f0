"""The `peft-jd` command line. Each concern registers its own subcommands (see `COMMAND_MODULES`)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional


# Modules exposing `register(subparsers)`; each adds its subcommands and sets `func` on them.
COMMAND_MODULES = (
    "peft_jd.compression.cli",  # compress, add, inspect
    "hub_tools.cli",  # push, pull, ls
    "peft_jd.zoo.cli",  # demo
    "peft_jd.export_cli",  # export-lora
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-jd",
        description="Compress thousands of LoRA adapters into shared bases + per-adapter Σ, and serve them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError, KeyError, TypeError) as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
