"""`peft-jd push`, `peft-jd pull` and `peft-jd ls` (registered by `peft_jd.cli` through `register`).

Contradictory arguments print one `error: …` line and return 2; failures raise a `JDLoraError` (a `ValueError`),
which `peft_jd.cli.main` prints as one `error: …` line with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, replace
from typing import Optional

from .errors import HubUsageError


logger = logging.getLogger(__name__)


def _hub_command(subparsers, name: str, help: str, func) -> argparse.ArgumentParser:
    """A subcommand running `func(args)`, with the Hub connection options every one of them takes."""
    parser = subparsers.add_parser(name, help=help)
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    parser.set_defaults(func=func)
    return parser


def register(subparsers) -> None:
    """Adds the `push`, `pull` and `ls` subcommands."""
    push = _hub_command(subparsers, "push", "upload a compressed collection to the Hugging Face Hub", _push)
    push.add_argument("collection", help="collection folder (bases/, adapters/<name>/, report.json)")
    push.add_argument("--repo", help="one repo holding bases/ and adapters/<name>/ as subfolders")
    push.add_argument("--bases-repo", help="repo for the bases (one repo per adapter layout)")
    push.add_argument("--adapter-repo", help="repo id template with {name}, e.g. 'org/{name}-jd'")
    push.add_argument("--adapters", nargs="+", help="push only these adapters")
    push.add_argument("--private", action="store_true", help="create missing repos as private")
    push.add_argument("--workers", type=int, default=8, help="adapter repos pushed in parallel")
    push.add_argument("--no-progress", action="store_true", help="hide progress bars")

    pull = _hub_command(subparsers, "pull", "download sigma adapter(s) and the bases commit they pin", _pull)
    pull.add_argument("repo", help="adapter repo, or collection repo (with --subfolder / --all / --adapters)")
    pull.add_argument("--subfolder", help="folder of the adapter inside the repo, e.g. adapters/task-17")
    pull.add_argument("--all", action="store_true", help="pull every adapter of the collection")
    pull.add_argument("--adapters", nargs="+", help="pull these adapters of the collection")
    pull.add_argument("--revision", help="branch, tag or commit sha")
    pull.add_argument("--local-dir", help="also write a self-contained copy (bases/ + adapters/<name>/) here")
    pull.add_argument("--overwrite", action="store_true",
                      help="replace --local-dir even if it holds files peft-jd did not write (they are deleted)")
    pull.add_argument("--cache-dir", help="huggingface_hub cache (default: HF_HUB_CACHE)")
    pull.add_argument("--offline", action="store_true", help="use the local cache only")

    ls = _hub_command(subparsers, "ls", "list the adapters, clusters and report figures of a pushed collection", _ls)
    ls.add_argument("repo", help="collection repo (bases repo or single collection repo) or adapter repo")
    ls.add_argument("--revision", help="branch, tag or commit sha")
    ls.add_argument("--json", action="store_true", help="print JSON")


def _location(repo_id: str, subfolder: Optional[str]) -> str:
    """`repo` or `repo/subfolder`, as the outputs show a place on the Hub."""
    return repo_id + (f"/{subfolder}" if subfolder else "")


def _usage_error(exc: HubUsageError) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _push(args) -> int:
    from .push import push_collection

    if args.workers < 1:
        return _usage_error(HubUsageError(f"--workers must be at least 1, got {args.workers}."))
    try:
        result = push_collection(
            args.collection, repo=args.repo, bases_repo=args.bases_repo, adapter_repo=args.adapter_repo,
            adapters=args.adapters, private=args.private, token=args.token, endpoint=args.endpoint,
            max_workers=args.workers, progress=not args.no_progress,
        )
    except HubUsageError as exc:
        return _usage_error(exc)
    print(f"bases: {_location(result.bases_repo, result.bases_subfolder)} @ {result.bases_revision} "
          f"({'uploaded' if result.bases_uploaded else 'unchanged'})")
    print(f"adapters: {len(result.uploaded)} uploaded, {len(result.adapters) - len(result.uploaded)} unchanged")
    return 0


def _pull(args) -> int:
    from .collection import pull_collection
    from .pull import pull_adapter

    problem = _pull_usage_problem(args)
    if problem:
        return _usage_error(HubUsageError(problem))
    kwargs = dict(revision=args.revision, local_dir=args.local_dir, overwrite=args.overwrite, token=args.token,
                  endpoint=args.endpoint, cache_dir=args.cache_dir, local_files_only=args.offline)
    if args.all or args.adapters:
        pulled = list(pull_collection(args.repo, names=args.adapters, **kwargs).values())
    else:
        pulled = [pull_adapter(args.repo, subfolder=args.subfolder, **kwargs)]
    for item in pulled:
        print(f"{item.name}\t{item.adapter_dir}")
    first = pulled[0]
    print(f"bases: {_location(first.bases_repo, first.bases_subfolder)} @ {first.bases_revision} -> "
          f"{first.bases_dir} (sha256 {first.fingerprint[:12]}… verified)")
    return 0


def _pull_usage_problem(args) -> str:
    if args.all and args.adapters:
        return "pass either --all or --adapters, not both."
    if args.subfolder and (args.all or args.adapters):
        return "--subfolder pulls one adapter; it cannot be combined with --all or --adapters."
    if args.overwrite and not args.local_dir:
        return "--overwrite replaces the --local-dir folder; pass --local-dir too."
    return ""


def _format_figures(figures: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(figures.items())) or "-"


def _ls(args) -> int:
    from .collection import list_collection

    listing = list_collection(args.repo, revision=args.revision, token=args.token, endpoint=args.endpoint)
    if args.json:
        data = asdict(replace(listing, report=None))  # the figures are in the adapters; the full report is not listed
        data.pop("report")
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    bases = listing.bases
    location = _location(bases.get("repo") or "?", bases.get("subfolder"))
    print(f"{listing.repo_id} @ {listing.revision[:12]}  ({listing.kind}"
          + (f", layout: {listing.layout}" if listing.layout else "") + ")")
    print(f"base model: {listing.base_model or '?'}")
    revision, fingerprint = bases.get("revision") or "?", bases.get("fingerprint") or "?"
    print(f"bases: {location} @ {revision[:12]}  sha256 {fingerprint[:12]}")
    rows = [("ADAPTER", "LOCATION", "CLUSTER", "REPORT")]
    for a in listing.adapters:
        where = _location(a.repo_id, a.subfolder)
        cluster = "per-module" if isinstance(a.cluster, dict) else str(a.cluster)
        stale = "" if not a.bases_revision or a.bases_revision == bases.get("revision") else \
            f" [older bases {a.bases_revision[:12]}]"
        rows.append((a.name, where, cluster, _format_figures(a.figures) + stale))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    if listing.report is not None:
        print(f"mean over the collection: {_format_figures(listing.report.mean_figures())}")
    print(f"{len(listing.adapters)} adapter(s)")
    return 0
