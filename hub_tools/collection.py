"""Reading a pushed collection back: `list_collection` (what `peft-jd ls` prints) and `pull_collection`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx2
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from peft_jd.core import ADAPTER_CONFIG_NAME

from .errors import HubToolsError, PullError
from .pull import PulledAdapter, pull_adapter
from .remote import INDEX_NAME, read_remote_json
from .report import REPORT_NAME, CollectionReport, parse_report


@dataclass
class ListedAdapter:
    """One adapter of a listing: where it is, its cluster, bases pin and report figures/failure."""

    name: str
    repo_id: str
    subfolder: Optional[str] = None
    cluster: Any = None
    bases_revision: Optional[str] = None
    figures: dict[str, float] = field(default_factory=dict)
    failure: Optional[str] = None


@dataclass
class CollectionListing:
    """What a repo holds: a collection (with its index) or a single sigma adapter.

    Args:
        repo_id: The listed repo; `revision` the commit sha that was read.
        kind: `"collection"` or `"adapter"`.
        layout: `"repos"` / `"subfolders"` for a collection, None for a single adapter.
        base_model: Base model of the collection.
        bases: `{"repo", "subfolder", "revision", "fingerprint"}` of the (current) bases.
        adapters: The adapters, sorted by name.
        failures: Adapters the compression report marks as failed (they were not pushed).
        report: The collection's report (empty when none was pushed).
    """

    repo_id: str
    revision: str
    kind: str
    layout: Optional[str]
    base_model: Optional[str]
    bases: dict[str, Any]
    adapters: list[ListedAdapter]
    failures: dict[str, str] = field(default_factory=dict)
    report: CollectionReport = field(default_factory=CollectionReport)


def _repo_sha(api: HfApi, repo_id: str, revision: Optional[str]) -> str:
    try:
        return api.repo_info(repo_id, revision=revision).sha
    except RevisionNotFoundError as exc:
        raise HubToolsError(f"{repo_id} has no revision {revision!r}.") from exc
    except RepositoryNotFoundError as exc:
        raise HubToolsError(f"repo {repo_id!r} not found, or private and not visible with your token.") from exc


def _from_index(repo_id: str, sha: str, index: dict, report: CollectionReport) -> CollectionListing:
    adapters = []
    for name, entry in sorted((index.get("adapters") or {}).items()):
        reported = report.adapters.get(name)
        adapters.append(ListedAdapter(
            name, entry.get("repo", repo_id), entry.get("subfolder"), entry.get("cluster"),
            entry.get("bases_revision"), reported.figures if reported else {}, reported.failure if reported else None,
        ))
    failures = {n: f for n, f in report.failures().items() if n not in index.get("adapters", {})}
    return CollectionListing(repo_id, sha, "collection", index.get("layout"), index.get("base_model"),
                             index.get("bases") or {}, adapters, failures, report)


def list_collection(
    repo_id: str, *, revision: Optional[str] = None, token: Optional[str] = None, endpoint: Optional[str] = None
) -> CollectionListing:
    """Lists a pushed collection (bases repo or single collection repo) or a single sigma adapter repo.

    Args:
        repo_id: The repo to list.
        revision: Branch, tag or commit (default: `main`).
        token: Hub token (default: the usual huggingface_hub sources).
        endpoint: Hub endpoint (default: `HF_ENDPOINT`).
    """
    api = HfApi(endpoint=endpoint, token=token)
    try:
        return _list(api, repo_id, revision)
    except (HfHubHTTPError, httpx2.TransportError) as exc:
        raise HubToolsError(f"listing {repo_id} failed: {type(exc).__name__}: {exc}") from exc


def _list(api: HfApi, repo_id: str, revision: Optional[str]) -> CollectionListing:
    sha = _repo_sha(api, repo_id, revision)
    index = read_remote_json(api, repo_id, INDEX_NAME, revision=sha)
    if index is not None:
        report_data = read_remote_json(api, repo_id, REPORT_NAME, revision=sha)
        report = parse_report(report_data, f"{repo_id}/{REPORT_NAME}") if report_data is not None else \
            CollectionReport()
        return _from_index(repo_id, sha, index, report)
    config = read_remote_json(api, repo_id, ADAPTER_CONFIG_NAME, revision=sha)
    if config is None or config.get("peft_type") != "JDLORA":
        raise HubToolsError(f"{repo_id}@{sha[:12]} is neither a JD-LoRA collection (no {INDEX_NAME}) nor a JD-LoRA "
                            "sigma adapter; was it pushed with `peft-jd push`?")
    bases = {"repo": config.get("bases"), "subfolder": config.get("bases_subfolder"),
             "revision": config.get("bases_revision"), "fingerprint": config.get("bases_fingerprint")}
    adapter = ListedAdapter(repo_id.split("/")[-1], repo_id, None, config.get("cluster"), config.get("bases_revision"))
    return CollectionListing(repo_id, sha, "adapter", None, config.get("base_model_name_or_path"), bases, [adapter])


def pull_collection(
    repo_id: str,
    *,
    names: Optional[Sequence[str]] = None,
    revision: Optional[str] = None,
    local_dir: Optional[str | os.PathLike] = None,
    token: Optional[str] = None,
    endpoint: Optional[str] = None,
    max_workers: int = 4,
    **kwargs,
) -> dict[str, PulledAdapter]:
    """Pulls the adapters of a pushed collection (all, or `names`), downloading the shared bases once.

    Args:
        repo_id: The collection's index repo (bases repo, or the single collection repo).
        names: Adapters to pull (default: every adapter of the index).
        revision: Revision of `repo_id` (also used for adapters stored in it).
        local_dir: Materialise `local_dir/bases/` + `local_dir/adapters/<name>/` as well.
        token: Hub token; `endpoint`: Hub endpoint.
        max_workers: Adapters downloaded in parallel (after the first, which fetches the bases).
        kwargs: Passed to `pull_adapter` (`cache_dir`, `local_files_only`).
    """
    listing = list_collection(repo_id, revision=revision, token=token, endpoint=endpoint)
    if listing.kind != "collection":
        raise PullError(f"{repo_id} is a single adapter, not a collection; use `pull_adapter`.")
    by_name = {a.name: a for a in listing.adapters}
    wanted = list(names) if names is not None else sorted(by_name)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise PullError(f"{repo_id} has no adapter(s) {unknown[:10]}; `peft-jd ls {repo_id}` lists them.")

    def pull(name: str) -> PulledAdapter:
        entry = by_name[name]
        return pull_adapter(entry.repo_id, subfolder=entry.subfolder, adapter_name=name, local_dir=local_dir,
                            revision=listing.revision if entry.repo_id == repo_id else None, token=token,
                            endpoint=endpoint, **kwargs)

    if not wanted:
        return {}
    # The first pull downloads the bases into the cache; the others then only fetch their Σ.
    pulled = {wanted[0]: pull(wanted[0])}
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        pulled.update(zip(wanted[1:], pool.map(pull, wanted[1:])))
    return pulled
