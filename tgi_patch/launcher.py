"""`jd-text-generation-launcher`: `text-generation-launcher` plus JD-LoRA collections.

Accepts every `text-generation-launcher` argument (passed through unchanged) and:

* `--jd-lora-adapters` (env `JD_LORA_ADAPTERS`): JD sigma adapters, see `tgi_patch.resolve` for the syntax;
* `--jd-lora-collection` (repeatable): serve every adapter of a collection;
* `--jd-lora-bases`: local bases directory to serve them with (default: the one their configs reference);
* `--jd-unknown-adapter error|warn`: what a request naming an adapter that is not loaded gets;
* `--jd-launcher`: the real launcher (default `text-generation-launcher`, env `PEFT_JD_TGI_LAUNCHER`);
* `--jd-dry-run`: print the command and environment instead of starting TGI.

It validates the adapters, appends them to `--lora-adapters` as `name=/local/dir` (TGI then loads them like LoRAs,
and skips downloading them), sets the shards' environment so that the patch activates, and `exec`s the launcher.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Optional

from . import settings as env_names
from .resolve import AdapterEntry, LaunchError, collection_entries, parse_adapter_entries, validate_all


PROG = "jd-text-generation-launcher"
BOOT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_boot")
DEFAULT_LAUNCHER = "text-generation-launcher"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, add_help=False, allow_abbrev=False,
        description="text-generation-launcher with JD-LoRA collections. Every other argument goes to TGI's launcher.",
    )
    jd = parser.add_argument_group("JD-LoRA options")
    jd.add_argument("--jd-lora-adapters", action="append", default=[], metavar="ENTRIES",
                    help="comma list of name=/dir, name=hf:owner/repo/folder@rev, owner/repo[@rev] or /dir")
    jd.add_argument("--jd-lora-collection", action="append", default=[], metavar="DIR_OR_REPO",
                    help="serve every adapters/<name>/ of a local collection or Hub repo (owner/repo[@rev])")
    jd.add_argument("--jd-lora-bases", metavar="DIR", help="local bases directory (default: from adapter configs)")
    jd.add_argument("--jd-unknown-adapter", choices=env_names.UNKNOWN_ADAPTER_POLICIES, default="error",
                    help="requests naming an adapter that is not loaded: fail them (error) or log and serve the base "
                         "model (warn)")
    jd.add_argument("--jd-launcher", default=os.environ.get("PEFT_JD_TGI_LAUNCHER", DEFAULT_LAUNCHER),
                    help="TGI launcher executable")
    jd.add_argument("--jd-dry-run", action="store_true", help="print the TGI command and environment and exit")
    parser.add_argument("--lora-adapters", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("-h", "--help", action="store_true", help=argparse.SUPPRESS)
    return parser


@dataclass
class LaunchPlan:
    """What `main` executes: the launcher's argv and the environment variables it adds or changes."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _jd_entries(options: argparse.Namespace, environ: dict[str, str]) -> list[AdapterEntry]:
    values = options.jd_lora_adapters or ([environ["JD_LORA_ADAPTERS"]] if environ.get("JD_LORA_ADAPTERS") else [])
    entries = [entry for value in values for entry in parse_adapter_entries(value)]
    for collection in options.jd_lora_collection:
        entries.extend(collection_entries(collection))
    return entries


def plan_launch(argv: list[str], environ: Optional[dict[str, str]] = None) -> LaunchPlan:
    """Parses the arguments, validates the JD adapters and builds the real launcher's command and environment.

    Args:
        argv: Arguments after the program name.
        environ: Environment to read (`os.environ` by default).

    Raises:
        LaunchError or a `peft_jd` error naming the adapter and the fix.
    """
    environ = dict(os.environ if environ is None else environ)
    options, passthrough = build_parser().parse_known_args(argv)
    lora_value = ",".join(options.lora_adapters) or environ.get("LORA_ADAPTERS", "")
    lora_entries = [e.strip() for e in lora_value.split(",") if e.strip()]
    lora_ids = [e.split("=", 1)[0].split("@", 1)[0] for e in lora_entries]
    resolved = validate_all(_jd_entries(options, environ), options.jd_lora_bases, lora_ids)
    plan = LaunchPlan(argv=[options.jd_launcher, *passthrough])
    if not resolved:
        plan.notes.append("no JD-LoRA adapter given; starting TGI unchanged")
        if lora_entries:
            plan.argv += ["--lora-adapters", ",".join(lora_entries)]
        return plan
    for adapter in resolved:
        if "@" in adapter.directory or "," in adapter.directory:
            raise LaunchError(f"JD adapter {adapter.name!r}: TGI cannot parse the path {adapter.directory!r} "
                              "('@' or ','); copy the adapter to a plain path.")
    all_entries = lora_entries + [f"{a.name}={a.directory}" for a in resolved]
    plan.argv += ["--lora-adapters", ",".join(all_entries)]
    if not _has_flag(passthrough, "--cuda-graphs") and "CUDA_GRAPHS" not in environ:
        # TGI 3.3.7 captures decode CUDA graphs without adapter data, so plain LoRAs are ignored in decode; the JD
        # graph path (static slot buffers) has not been verified on a GPU yet. Opt in with --cuda-graphs.
        plan.argv += ["--cuda-graphs", "0"]
        plan.notes.append("adding --cuda-graphs 0 (adapters in CUDA-graph decode: see docs/tgi.md)")
    elif lora_entries:
        plan.notes.append("warning: TGI does not apply plain LoRA adapters in CUDA-graph decode; use --cuda-graphs 0")
    python_path = environ.get("PYTHONPATH", "")
    plan.env = {
        env_names.ENABLE_ENV: "1",
        env_names.ADAPTERS_ENV: ",".join(a.name for a in resolved),
        env_names.BASES_ENV: resolved[0].bases_dir,
        env_names.UNKNOWN_ADAPTER_ENV: options.jd_unknown_adapter,
        "PYTHONPATH": BOOT_DIR + (os.pathsep + python_path if python_path else ""),
    }
    plan.notes.append(f"serving {len(resolved)} JD-LoRA adapter(s) with bases {resolved[0].bases_dir}")
    if importlib.util.find_spec("text_generation_server") is None:
        plan.notes.append("warning: text_generation_server is not importable from this Python; install peft-jd into "
                          "TGI's environment (the shards must import tgi_patch)")
    return plan


def _print_help(launcher: str) -> None:
    build_parser().print_help()
    print(f"\nOptions of {launcher} follow.\n", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options, _ = build_parser().parse_known_args(argv)
    if options.help:
        _print_help(options.jd_launcher)
        if shutil.which(options.jd_launcher) and not options.jd_dry_run:
            os.execvp(options.jd_launcher, [options.jd_launcher, "--help"])
        return 0
    try:
        plan = plan_launch(argv)
    except (ValueError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    for note in plan.notes:
        print(f"{PROG}: {note}", file=sys.stderr)
    if options.jd_dry_run:
        print(json.dumps({"argv": plan.argv, "env": plan.env}, indent=2))
        return 0
    if shutil.which(plan.argv[0]) is None:
        print(f"{PROG}: error: {plan.argv[0]!r} not found; run inside TGI's image or pass --jd-launcher.",
              file=sys.stderr)
        return 2
    os.environ.update(plan.env)
    os.execvp(plan.argv[0], plan.argv)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
