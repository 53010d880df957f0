"""The `peft-jd` command line. Each concern registers its own subcommands (see `COMMAND_MODULES`)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional

from .core.errors import JDLoraError, UsageError


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
    except UsageError as exc:
        if args.verbose:
            raise
        parser.print_usage(sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (JDLoraError, ValueError, OSError) as exc:
        # Bad input: the message names the file/adapter and the fix; a traceback would only hide it.
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug, not bad input: say so instead of a bare traceback
        if args.verbose:
            raise
        print(
            f"error: internal error ({type(exc).__name__}: {exc}). Rerun with -v for the traceback and report it.",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
