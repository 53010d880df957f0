"""`pull_adapter` / `pull_collection`: download sigma adapters and the exact bases commit they pin.

Every file comes through `peft_jd.core.hub_download` (huggingface_hub's cache, `HF_HOME`, offline mode,
`local_files_only`, one error mapping): bases pinned to a commit sha are downloaded once and shared by every adapter
that pins them. Before anything is returned, the bases file is checked against the sha256 the adapter and the bases
config record, and the adapter against its bases with `peft_jd.core.validate_against_bases`.

Names and subfolders read from the network (index keys, adapter configs) are checked before they are used in a path
(`peft_jd.core.check_path_component`, `confined_path`, `check_hub_path`). With `local_dir`, a self-contained copy is
written as `local_dir/bases/` + `local_dir/adapters/<name>/` (hard links into the cache where possible) under the
folder's writers' lock: a new or empty folder is written whole, one a pull wrote before (same bases) gets the new
adapters; any other non-empty folder (a user's, a `compress` output) is refused unless `overwrite=True`.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import httpx2
from huggingface_hub import HfApi
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionResolutionError,
)
from huggingface_hub.utils import validate_repo_id

from peft_jd.core import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS_NAME,
    BASES_CONFIG_NAME,
    BASES_DIR,
    BASES_FILES,
    BASES_WEIGHTS_NAME,
    CARD_NAME,
    KIND_COLLECTION,
    REPORT_NAME,
    AdapterSpec,
    BasesConfig,
    BasesMismatchError,
    DestinationError,
    adapter_dir,
    atomic_directory,
    bases_dir,
    check_path_component,
    check_replaceable,
    hub_download,
    read_adapter_tensors,
    read_marker,
    recover_interrupted_swap,
    report_path,
    validate_against_bases,
    writer_lock,
)
from peft_jd.core.hub import describe

from .errors import BasesPullError, PullError
from .local import config_json_bytes, verified_sha256
from .remote import check_subfolder, download_optional


logger = logging.getLogger(__name__)


@dataclass
class PulledAdapter:
    """A downloaded sigma adapter and its verified bases.

    Args:
        name: Adapter name (repo name, or folder name inside a collection repo).
        repo_id: Hub repo of the adapter; `subfolder` its folder in it.
        revision: Commit sha the adapter files were downloaded from.
        adapter_dir: Local folder with `adapter_config.json` and `adapter_model.safetensors`.
        bases_repo: Hub repo of the bases; `bases_subfolder` their folder; `bases_revision` the pinned commit.
        bases_dir: Local folder with the verified bases files.
        fingerprint: sha256 of the bases weights (checked against the adapter's record).
    """

    name: str
    repo_id: str
    subfolder: Optional[str]
    revision: str
    adapter_dir: Path
    bases_repo: str
    bases_subfolder: Optional[str]
    bases_revision: str
    bases_dir: Path
    fingerprint: str

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """Arguments for `PeftModel.from_pretrained(base_model, **kwargs)` loading this exact adapter from the Hub."""
        kwargs = {"model_id": self.repo_id, "revision": self.revision}
        if self.subfolder:
            kwargs["subfolder"] = self.subfolder
        return kwargs


@dataclass
class Download:
    """A verified adapter in the Hub cache, with what `local_dir` needs to copy it."""

    pulled: PulledAdapter
    config: dict[str, Any]
    card: Optional[Path] = None


def _download_adapter(repo_id: str, subfolder: Optional[str], revision: Optional[str],
                      hub_kwargs: dict) -> tuple[Path, str]:
    """`(folder in the cache, commit sha)` of an adapter's config and weights."""
    try:
        paths = hub_download(repo_id, ADAPTER_FILES, subfolder=subfolder, revision=revision, what="adapter",
                             error_cls=PullError, **hub_kwargs)
    except PullError as exc:
        cause = exc.__cause__
        if not subfolder and isinstance(cause, EntryNotFoundError) and not isinstance(cause, LocalEntryNotFoundError):
            raise PullError(f"{exc} For a collection repo, pass the adapter folder (e.g. subfolder='adapters/<name>') "
                            "or pull the whole collection.") from cause
        raise
    # huggingface_hub's cache: <repo cache>/snapshots/<commit>/<subfolder>/<file>.
    depth = len(subfolder.split("/")) if subfolder else 0
    commit_dir = Path(paths[0]).parents[depth]
    if commit_dir.parent.name != "snapshots":
        raise PullError(f"{paths[0]} is not laid out like huggingface_hub's cache; cannot tell which commit of "
                        f"{describe(repo_id, subfolder, revision)} it holds.")
    return Path(paths[0]).parent, commit_dir.name


def _bases_location(spec: AdapterSpec, where: str) -> tuple[str, Optional[str]]:
    """The bases repo and subfolder of a downloaded adapter, refused unless both are plain Hub names."""
    bases, bases_subfolder = spec.bases_reference()[0], spec.bases_subfolder
    try:
        validate_repo_id(bases)
    except HFValidationError:
        raise PullError(f"{where}: adapter points to bases {bases!r}, which is not a Hub repo id (a local folder?); "
                        "it was uploaded without `peft-jd push`, which rewrites the bases reference to the pushed "
                        "bases.") from None
    return bases, check_subfolder(bases_subfolder, f"{where}: bases subfolder")


def _current_commit(api: HfApi, bases_repo: str, same_repo_commit: Optional[str], adapter: str,
                    local_files_only: bool) -> str:
    """Bases commit of an adapter that pins none (not pushed with `peft-jd push`); its sha256 is still checked."""
    if same_repo_commit:
        return same_repo_commit
    try:
        return api.resolve_revision(bases_repo, local_files_only=local_files_only).resolved
    except RepositoryNotFoundError as exc:
        raise BasesPullError(f"adapter {adapter!r}: bases repo {bases_repo!r} not found or not accessible.") from exc
    except (RevisionResolutionError, HfHubHTTPError, httpx2.TransportError, ConnectionError, TimeoutError) as exc:
        raise PullError(f"adapter {adapter!r} does not pin its bases and the current commit of {bases_repo!r} cannot "
                        f"be resolved ({exc}).") from exc


def _verify(spec: AdapterSpec, adapter_files: Path, bases_files: Path, where: str) -> str:
    """Checks the bases files against the records, and the adapter against its bases; returns the bases' sha256."""
    bases_config = BasesConfig.from_file(bases_files / BASES_CONFIG_NAME)
    actual = verified_sha256(bases_files / BASES_WEIGHTS_NAME)
    for label, expected in (("the adapter", spec.bases_fingerprint), ("the bases config", bases_config.fingerprint)):
        if expected and expected != actual:
            raise BasesMismatchError(
                f"bases {where} downloaded for adapter {spec.name!r} have sha256 {actual[:12]}…, but {label} records "
                f"{expected[:12]}…. The file is corrupt or the repo was rewritten; delete it from the cache "
                f"({bases_files}) and pull again."
            )
    sigmas, _saved = read_adapter_tensors(spec, adapter_files / ADAPTER_WEIGHTS_NAME)
    validate_against_bases(spec, sigmas, bases_config, bases_label=where)
    return actual


def download_adapter(repo_id: str, subfolder: Optional[str], revision: Optional[str], adapter_name: Optional[str],
                     api: HfApi, hub_kwargs: dict, with_card: bool = False) -> Download:
    """Downloads and verifies one adapter and its bases into the Hub cache (see `pull_adapter`); writes nothing
    else."""
    subfolder = check_subfolder(subfolder)
    name = check_path_component(adapter_name or posixpath.basename(subfolder or repo_id), "adapter name")
    where = describe(repo_id, subfolder, revision)
    files, commit = _download_adapter(repo_id, subfolder, revision, hub_kwargs)
    spec = AdapterSpec.from_directory(files, name=name, hub_repo=repo_id, hub_subfolder=subfolder, hub_revision=commit)
    bases_repo, bases_subfolder = _bases_location(spec, where)
    bases_revision = spec.bases_revision
    if not bases_revision:
        bases_revision = _current_commit(api, bases_repo, commit if bases_repo == repo_id else None, name,
                                         bool(hub_kwargs.get("local_files_only")))
        logger.warning("%s does not pin its bases revision; using %s@%s.", where, bases_repo, bases_revision)
    bases_where = describe(bases_repo, bases_subfolder, bases_revision)
    bases_paths = hub_download(bases_repo, BASES_FILES, subfolder=bases_subfolder, revision=bases_revision,
                               what=f"bases of adapter {name!r}", error_cls=BasesPullError, **hub_kwargs)
    bases_files = Path(bases_paths[0]).parent
    fingerprint = _verify(spec, files, bases_files, bases_where)
    card = None
    if with_card:
        try:
            found = download_optional(repo_id, posixpath.join(subfolder or "", CARD_NAME), commit, **hub_kwargs)
            card = Path(found) if found else None
        except PullError as exc:  # the card is documentation; the adapter is complete without it
            logger.info("no model card copied for %s: %s", where, exc)
    pulled = PulledAdapter(name, repo_id, subfolder, commit, files, bases_repo, bases_subfolder, bases_revision,
                           bases_files, fingerprint)
    return Download(pulled, spec.config, card)


def _place(source: Path, target: Path) -> None:
    """Hard-links a cache file into `target` (no second copy of multi-GB bases), copying across file systems."""
    try:
        os.link(os.path.realpath(source), target)
    except OSError:
        shutil.copyfile(source, target)


def _fill_bases(folder: Path, download: Download) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in BASES_FILES:
        _place(download.pulled.bases_dir / name, folder / name)


def _fill_adapter(folder: Path, download: Download) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # Locally the adapter points to the sibling bases folder; repo and sha stay recorded for provenance.
    local_config = {**download.config, "bases": f"../../{BASES_DIR}", "bases_subfolder": None}
    (folder / ADAPTER_CONFIG_NAME).write_bytes(config_json_bytes(local_config))
    _place(download.pulled.adapter_dir / ADAPTER_WEIGHTS_NAME, folder / ADAPTER_WEIGHTS_NAME)
    if download.card is not None:
        _place(download.card, folder / CARD_NAME)


def _add_to_pulled_folder(root: Path, downloads: Sequence[Download]) -> None:
    """Adds adapters to a folder a pull wrote before (the caller holds its lock); its bases must be the same."""
    first = downloads[0].pulled
    if report_path(root).exists():
        raise DestinationError(
            f"{root} is the output of `peft-jd compress` (it has {REPORT_NAME}); pulled adapters would be missing "
            "from its report. Pull into another folder, or pass overwrite=True / --overwrite to replace it."
        )
    weights = bases_dir(root) / BASES_WEIGHTS_NAME
    if weights.is_file() and not weights.is_symlink():
        if verified_sha256(weights) != first.fingerprint:
            raise BasesMismatchError(
                f"{bases_dir(root)} holds other bases than the ones adapter {first.name!r} pins "
                f"({describe(first.bases_repo, first.bases_subfolder, first.bases_revision)}); a local folder serves "
                "one bases revision. Pull into another local_dir (or pass overwrite=True / --overwrite to replace it)."
            )
    else:
        with atomic_directory(bases_dir(root)) as tmp:
            _fill_bases(tmp, downloads[0])
    for download in downloads:
        with atomic_directory(adapter_dir(root, download.pulled.name)) as tmp:
            _fill_adapter(tmp, download)


def materialise(local_dir: str | os.PathLike, downloads: Sequence[Download], overwrite: bool = False) -> None:
    """Writes `local_dir/bases/` + `local_dir/adapters/<name>/` for verified downloads (all of one bases revision).

    Refused (nothing written): a non-empty `local_dir` that peft-jd did not write as a collection unless `overwrite`,
    a file or link in its place, adapters of several bases revisions, a name that would leave `local_dir`.
    """
    root = Path(local_dir)
    fingerprints = sorted({d.pulled.fingerprint for d in downloads})
    if len(fingerprints) > 1:
        shown = ", ".join(f[:12] for f in fingerprints)
        raise BasesMismatchError(
            f"the adapters to pull into {root} pin {len(fingerprints)} different bases ({shown}); a local folder "
            "serves one bases revision. Pull them into separate folders (choose them with --adapters)."
        )
    for download in downloads:
        adapter_dir(root, download.pulled.name)  # refuses a name that leaves root before anything is written
    with writer_lock(root):
        recover_interrupted_swap(root)
        check_replaceable(root, KIND_COLLECTION, overwrite)
        if not overwrite and read_marker(root) == KIND_COLLECTION:
            _add_to_pulled_folder(root, downloads)
        else:
            with atomic_directory(root, overwrite=overwrite, kind=KIND_COLLECTION) as tmp:
                _fill_bases(bases_dir(tmp), downloads[0])
                for download in downloads:
                    _fill_adapter(adapter_dir(tmp, download.pulled.name), download)
    for download in downloads:
        download.pulled.adapter_dir = adapter_dir(root, download.pulled.name)
        download.pulled.bases_dir = bases_dir(root)


def pull_adapter(
    repo_id: str,
    *,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    adapter_name: Optional[str] = None,
    local_dir: Optional[str | os.PathLike] = None,
    overwrite: bool = False,
    cache_dir: Optional[str | os.PathLike] = None,
    token: Optional[str] = None,
    endpoint: Optional[str] = None,
    local_files_only: bool = False,
) -> PulledAdapter:
    """Downloads one sigma adapter and the bases commit it pins, and verifies both.

    Args:
        repo_id: Hub repo of the adapter (or of the collection, with `subfolder`).
        subfolder: Folder of the adapter inside `repo_id` (single-repo collections: `"adapters/<name>"`); each part
            must be a valid adapter name (letters, digits, `_`, `-`, `.` not first).
        revision: Branch, tag or commit of the adapter (default: `main`).
        adapter_name: Name for `local_dir/adapters/<name>`; defaults to the repo name or folder name.
        local_dir: Also materialise a self-contained copy there (`bases/` + `adapters/<name>/`).
        overwrite: Replace `local_dir` even if it holds files peft-jd did not write (everything in it is lost).
        cache_dir: huggingface_hub cache (default: `HF_HUB_CACHE`).
        token: Hub token (default: the usual huggingface_hub sources).
        endpoint: Hub endpoint (default: `HF_ENDPOINT`).
        local_files_only: Use the cache only (as with `HF_HUB_OFFLINE=1`).

    Returns:
        A `PulledAdapter`. Raises `PullError`, `BasesNotFoundError`, `BasesMismatchError`, `DestinationError` or
        another `JDLoraError` of the adapter validation (never a partial result).
    """
    api = HfApi(endpoint=endpoint, token=token)
    hub_kwargs = {"cache_dir": cache_dir, "local_files_only": local_files_only, "token": token, "endpoint": endpoint}
    download = download_adapter(repo_id, subfolder, revision, adapter_name, api, hub_kwargs,
                                with_card=local_dir is not None)
    if local_dir is not None:
        materialise(local_dir, [download], overwrite)
    return download.pulled
