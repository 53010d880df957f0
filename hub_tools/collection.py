"""Reading a pushed collection back: `list_collection` (what `peft-jd ls` prints) and `pull_collection`."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx2
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from peft_jd.compression.report import CompressionReport
from peft_jd.core import ADAPTER_CONFIG_NAME, INDEX_NAME, PEFT_TYPE, REPORT_NAME, AdapterFormatError

from .errors import HubToolsError, PullError
from .pull import PulledAdapter, download_adapter, materialise
from .remote import parse_index, read_remote_json


logger = logging.getLogger(__name__)


@dataclass
class ListedAdapter:
    """One adapter of a listing: where it is, its cluster, bases pin and report figures."""

    name: str
    repo_id: str
    subfolder: Optional[str] = None
    cluster: Any = None
    bases_revision: Optional[str] = None
    figures: dict[str, float] = field(default_factory=dict)


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
        report: The collection's compression report (None when none was pushed, or it is not a peft-jd report).
    """

    repo_id: str
    revision: str
    kind: str
    layout: Optional[str]
    base_model: Optional[str]
    bases: dict[str, Any]
    adapters: list[ListedAdapter]
    report: Optional[CompressionReport] = None


def _repo_sha(api: HfApi, repo_id: str, revision: Optional[str]) -> str:
    try:
        return api.repo_info(repo_id, revision=revision).sha
    except RevisionNotFoundError as exc:
        raise HubToolsError(f"{repo_id} has no revision {revision!r}.") from exc
    except RepositoryNotFoundError as exc:
        raise HubToolsError(f"repo {repo_id!r} not found, or private and not visible with your token.") from exc


def _from_index(repo_id: str, sha: str, index: Any, report: Optional[CompressionReport]) -> CollectionListing:
    entries = parse_index(index, f"{repo_id}@{sha[:12]}/{INDEX_NAME}")
    adapters = [
        ListedAdapter(name, entry["repo"], entry["subfolder"], entry.get("cluster"), entry.get("bases_revision"),
                      report.adapter_figures(name) if report is not None else {})
        for name, entry in sorted(entries.items())
    ]
    return CollectionListing(repo_id, sha, "collection", index.get("layout"), index.get("base_model"),
                             index.get("bases") or {}, adapters, report)


def _remote_report(repo_id: str, sha: str, hub_kwargs: dict) -> Optional[CompressionReport]:
    """The pushed `report.json`, read defensively: a missing, unreadable or foreign report is None, never fatal."""
    try:
        data = read_remote_json(repo_id, REPORT_NAME, sha, **hub_kwargs)
        return None if data is None else CompressionReport.from_dict(data, f"{repo_id}/{REPORT_NAME}")
    except (PullError, AdapterFormatError) as exc:
        logger.warning("%s (listing without the compression report)", exc)
        return None


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
        return _list(api, repo_id, revision, {"token": token, "endpoint": endpoint})
    except (HfHubHTTPError, httpx2.TransportError, ConnectionError, TimeoutError) as exc:
        raise HubToolsError(f"listing {repo_id} failed: {type(exc).__name__}: {exc}") from exc


def _list(api: HfApi, repo_id: str, revision: Optional[str], hub_kwargs: dict) -> CollectionListing:
    sha = _repo_sha(api, repo_id, revision)
    index = read_remote_json(repo_id, INDEX_NAME, sha, **hub_kwargs)
    if index is not None:
        return _from_index(repo_id, sha, index, _remote_report(repo_id, sha, hub_kwargs))
    config = read_remote_json(repo_id, ADAPTER_CONFIG_NAME, sha, **hub_kwargs)
    if not isinstance(config, dict) or config.get("peft_type") != PEFT_TYPE:
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
    overwrite: bool = False,
    token: Optional[str] = None,
    endpoint: Optional[str] = None,
    max_workers: int = 4,
    cache_dir: Optional[str | os.PathLike] = None,
    local_files_only: bool = False,
) -> dict[str, PulledAdapter]:
    """Pulls the adapters of a pushed collection (all, or `names`), downloading the shared bases once.

    Every adapter is downloaded and verified before anything is written to `local_dir`; the index's names and
    subfolders are checked first (a name or subfolder that would leave `local_dir` or the Hub cache is a `PullError`).

    Args:
        repo_id: The collection's index repo (bases repo, or the single collection repo).
        names: Adapters to pull (default: every adapter of the index; an index without adapters is a `PullError`).
        revision: Revision of `repo_id` (also used for adapters stored in it).
        local_dir: Materialise `local_dir/bases/` + `local_dir/adapters/<name>/` as well.
        overwrite: Replace `local_dir` even if it holds files peft-jd did not write (everything in it is lost).
        token: Hub token; `endpoint`: Hub endpoint.
        max_workers: Adapters downloaded in parallel (after the first, which fetches the bases).
        cache_dir: huggingface_hub cache; `local_files_only`: use the cache only.
    """
    listing = list_collection(repo_id, revision=revision, token=token, endpoint=endpoint)
    if listing.kind != "collection":
        raise PullError(f"{repo_id} is a single adapter, not a collection; use `pull_adapter`.")
    by_name = {a.name: a for a in listing.adapters}
    if names is None and not by_name:
        raise PullError(f"the index of {repo_id}@{listing.revision[:12]} lists no adapters; there is nothing to pull. "
                        "Push a collection with adapters first (`peft-jd push`).")
    wanted = list(dict.fromkeys(names)) if names is not None else sorted(by_name)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise PullError(f"{repo_id} has no adapter(s) {unknown[:10]}; `peft-jd ls {repo_id}` lists them.")
    if not wanted:
        return {}
    api = HfApi(endpoint=endpoint, token=token)
    hub_kwargs = {"cache_dir": cache_dir, "local_files_only": local_files_only, "token": token, "endpoint": endpoint}

    def download(name: str):
        entry = by_name[name]
        return download_adapter(entry.repo_id, entry.subfolder, listing.revision if entry.repo_id == repo_id else None,
                                name, api, hub_kwargs, with_card=local_dir is not None)

    # The first download fetches the bases into the cache; the others then only fetch their Σ.
    downloads = [download(wanted[0])]
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        downloads += list(pool.map(download, wanted[1:]))
    if local_dir is not None:
        materialise(local_dir, downloads, overwrite)
    return {d.pulled.name: d.pulled for d in downloads}
