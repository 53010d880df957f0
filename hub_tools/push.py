"""`push_collection`: upload a compressed collection to the Hub, bases once, every adapter pinned to them.

Two layouts:

* `"repos"`: one bases repo plus one small repo per adapter (`adapter_repo="org/{name}-jd"`); each adapter config
  points to `bases="org/bases-repo"` at the commit sha of the bases.
* `"subfolders"`: one repo holding `bases/` and `adapters/<name>/`; configs keep `bases="../../bases"` (resolved inside
  the same repo) and pin the commit that holds the bases.

Only files whose content differs from the Hub are committed, so re-pushing an unchanged collection uploads nothing,
an interrupted push resumes where it stopped, and adapters added later with `peft-jd add` are the only ones uploaded.
The collection index (`jd_collection.json`) and cards are committed last, only once every adapter is on the Hub.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx2
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id
from tqdm.auto import tqdm

from peft_jd.compression.cards import collection_card, sigma_card
from peft_jd.core import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    BASES_DIR,
    BASES_FILES,
    BASES_WEIGHTS_NAME,
    CARD_NAME,
    INDEX_NAME,
    REPORT_NAME,
    adapter_subfolder,
    writer_lock,
)

from . import remote
from .errors import CollectionError, HubAuthError, HubUsageError, PullError, PushError
from .local import LocalCollection, read_collection
from .remote import INDEX_FORMAT, Upload


logger = logging.getLogger(__name__)


@dataclass
class PushedAdapter:
    """Where one adapter now lives on the Hub and what this push uploaded for it."""

    name: str
    repo_id: str
    subfolder: Optional[str]
    uploaded_files: int
    commit: Optional[str] = None


@dataclass
class PushResult:
    """Outcome of `push_collection`.

    Args:
        layout: `"repos"` or `"subfolders"`.
        bases_repo: Repo holding the bases.
        bases_subfolder: Their folder in it (`"bases"` in the single-repo layout).
        bases_revision: Commit sha every pushed adapter pins.
        bases_uploaded: Whether this push uploaded the bases (False when they were already there).
        adapters: Per adapter name, where it lives and what was uploaded.
    """

    layout: str
    bases_repo: str
    bases_subfolder: Optional[str]
    bases_revision: str
    bases_uploaded: bool
    adapters: dict[str, PushedAdapter] = field(default_factory=dict)

    @property
    def uploaded(self) -> list[str]:
        """Names of the adapters this push uploaded something for."""
        return sorted(name for name, a in self.adapters.items() if a.uploaded_files)


def _layout(repo: Optional[str], bases_repo: Optional[str], adapter_repo: Optional[str]) -> str:
    if repo and not (bases_repo or adapter_repo):
        return "subfolders"
    if bases_repo and adapter_repo and not repo:
        if "{name}" not in adapter_repo:
            raise HubUsageError(
                f"adapter_repo must contain '{{name}}' (e.g. 'org/{{name}}-jd'), got {adapter_repo!r}."
            )
        return "repos"
    raise HubUsageError(
        "choose one layout: `repo=` (bases and adapters as subfolders of one repo) or `bases_repo=` together with "
        "`adapter_repo=` (one bases repo plus one repo per adapter, e.g. 'org/{name}-jd')."
    )


def _check_repo_ids(repo_ids: dict[str, str]) -> None:
    for name, repo_id in repo_ids.items():
        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            raise CollectionError(
                f"adapter {name!r} maps to repo id {repo_id!r}, which the Hub does not accept ({exc}). Rename the "
                "adapter folder or change the --adapter-repo template."
            ) from None
        if repo_id.count("/") != 1:
            raise CollectionError(f"adapter {name!r}: repo id {repo_id!r} must be 'namespace/name'.")


def _raise_if_refused(exc: HfHubHTTPError, problem: str, fix: str) -> None:
    """`HubAuthError("<problem> (<status>): <fix>")` when the Hub refused the token (401 / 403); returns otherwise."""
    status = getattr(exc.response, "status_code", None)
    if status in (401, 403):
        raise HubAuthError(f"{problem} ({status}): {fix}") from exc


def _check_token(api: HfApi) -> None:
    """Fails early, with the fix, when there is no usable token (instead of a 401 after uploading the bases)."""
    try:
        api.whoami()
    except LocalTokenNotFoundError:
        raise HubAuthError(
            "no Hugging Face token found: run `hf auth login`, set HF_TOKEN, or pass token=… (it needs write access)."
        ) from None
    except HfHubHTTPError as exc:
        _raise_if_refused(exc, f"{api.endpoint} rejected your token", "it is invalid or expired. Create a token with "
                          "write access and log in again (`hf auth login`) or set HF_TOKEN.")
        raise PushError(f"{api.endpoint} did not answer the token check ({' '.join(str(exc).split())}); nothing was "
                        "uploaded. Retry when the Hub answers.") from exc
    except (httpx2.TransportError, ConnectionError, TimeoutError) as exc:
        raise PushError(f"cannot reach {api.endpoint} ({type(exc).__name__}: {exc}); nothing was uploaded. Check the "
                        "network and HF_ENDPOINT, then retry.") from exc


def _ensure_repo(api: HfApi, repo_id: str, private: bool) -> None:
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
    except HfHubHTTPError as exc:
        _raise_if_refused(exc, f"cannot create or write {repo_id!r} with your token",
                          "check the namespace and that the token has write access to it.")
        raise


def _push_bases(api: HfApi, collection: LocalCollection, repo_id: str, folder: str) -> tuple[str, bool]:
    prefix = f"{folder}/" if folder else ""
    uploads = [Upload(prefix + name, collection.bases_dir / name) for name in BASES_FILES]
    todo = remote.changed(api, repo_id, uploads)
    remote.commit(api, repo_id, todo, f"Upload JD-LoRA bases (sha256 {collection.fingerprint[:12]})")
    return remote.bases_pin(api, repo_id, folder), bool(todo)


def _push_adapter_repo(api: HfApi, collection: LocalCollection, name: str, repo_id: str, bases_repo: str,
                       pin: str, private: bool) -> PushedAdapter:
    adapter = collection.adapters[name]
    entry = collection.report.adapters.get(name) if collection.report is not None else None
    card = sigma_card(name, repo_id, adapter.config, os.path.getsize(adapter.weights), collection.bases_config,
                      bases_repo, pin, report=entry)
    uploads = [
        Upload(ADAPTER_CONFIG_NAME, adapter.config_for_hub(bases_repo, pin, None)),
        Upload(ADAPTER_WEIGHTS_NAME, adapter.weights),
        Upload(CARD_NAME, card.encode("utf-8")),
    ]
    try:
        todo = remote.changed(api, repo_id, uploads)
    except RepositoryNotFoundError:
        _ensure_repo(api, repo_id, private)
        todo = uploads
    sha = remote.commit(api, repo_id, todo, f"Upload JD-LoRA adapter {name} (bases {bases_repo}@{pin[:12]})")
    return PushedAdapter(name, repo_id, None, len(todo), sha)


def _raise_if_failed(failures: dict[str, BaseException], total: int) -> None:
    if not failures:
        return
    shown = "; ".join(f"{name}: {type(exc).__name__}: {exc}" for name, exc in list(failures.items())[:3])
    raise PushError(
        f"{len(failures)} of {total} adapters were not pushed ({shown}). Everything already on the Hub is complete "
        "and pinned to its bases, and the collection index was not updated. Re-run the same push to resume: files "
        "already uploaded are skipped."
    ) from next(iter(failures.values()))


def _push_repos(api: HfApi, collection: LocalCollection, bases_repo: str, repo_ids: dict[str, str], private: bool,
                max_workers: int, progress: bool) -> PushResult:
    _ensure_repo(api, bases_repo, private)
    pin, bases_uploaded = _push_bases(api, collection, bases_repo, "")
    result = PushResult("repos", bases_repo, None, pin, bases_uploaded)
    failures: dict[str, BaseException] = {}
    with ThreadPoolExecutor(max_workers=max_workers) as pool, \
            tqdm(total=len(repo_ids), desc="pushing adapters", unit="adapter", disable=not progress) as bar:
        futures = {
            pool.submit(_push_adapter_repo, api, collection, name, repo_id, bases_repo, pin, private): name
            for name, repo_id in repo_ids.items()
        }
        try:
            for future in as_completed(futures):
                name = futures[future]
                try:
                    result.adapters[name] = future.result()
                except Exception as exc:  # one adapter failing must not hide which others made it
                    failures[name] = exc
                bar.update()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    _raise_if_failed(failures, len(repo_ids))
    entries = {a.name: {"repo": a.repo_id, "subfolder": None} for a in result.adapters.values()}
    _push_index(api, collection, bases_repo, "", result, entries)
    return result


def _push_subfolders(api: HfApi, collection: LocalCollection, repo_id: str, private: bool, adapters_per_commit: int,
                     progress: bool) -> PushResult:
    _ensure_repo(api, repo_id, private)
    pin, bases_uploaded = _push_bases(api, collection, repo_id, BASES_DIR)
    result = PushResult("subfolders", repo_id, BASES_DIR, pin, bases_uploaded)
    # Adapters sit two levels below the repo root, next to `bases/`: the relative reference stays valid on the Hub.
    relative_bases = f"../../{BASES_DIR}"
    uploads: dict[str, list[Upload]] = {}
    for name, adapter in collection.adapters.items():
        folder = adapter_subfolder(name)
        uploads[name] = [
            Upload(f"{folder}/{ADAPTER_CONFIG_NAME}", adapter.config_for_hub(relative_bases, pin, None)),
            Upload(f"{folder}/{ADAPTER_WEIGHTS_NAME}", adapter.weights),
        ]
    todo_paths = {u.path_in_repo for u in remote.changed(api, repo_id, [u for us in uploads.values() for u in us])}
    pending = [name for name in uploads if any(u.path_in_repo in todo_paths for u in uploads[name])]
    for name in uploads:
        result.adapters[name] = PushedAdapter(name, repo_id, adapter_subfolder(name), 0)
    with tqdm(total=len(pending), desc="pushing adapters", unit="adapter", disable=not progress) as bar:
        for start in range(0, len(pending), adapters_per_commit):
            batch = pending[start : start + adapters_per_commit]
            files = [u for name in batch for u in uploads[name] if u.path_in_repo in todo_paths]
            try:
                sha = remote.commit(api, repo_id, files, f"Upload {len(batch)} JD-LoRA adapter(s) "
                                    f"(bases {BASES_DIR}/@{pin[:12]})")
            except Exception as exc:
                _raise_if_failed({name: exc for name in pending[start:]}, len(uploads))
            for name in batch:
                result.adapters[name].uploaded_files = sum(u.path_in_repo in todo_paths for u in uploads[name])
                result.adapters[name].commit = sha
            bar.update(len(batch))
    entries = {a.name: {"repo": repo_id, "subfolder": a.subfolder} for a in result.adapters.values()}
    _push_index(api, collection, repo_id, BASES_DIR, result, entries)
    return result


def _previous_entries(api: HfApi, repo_id: str, layout: str) -> dict[str, dict[str, Any]]:
    """The adapters the repo's current index lists (merged with this push's), checked like a pull checks them."""
    try:
        previous = remote.read_remote_json(repo_id, INDEX_NAME, endpoint=api.endpoint, token=api.token)
        if previous is None:
            return {}
        entries = remote.parse_index(previous, f"{repo_id}/{INDEX_NAME}")
    except PullError as exc:
        raise PushError(
            f"every adapter is on the Hub, but the index could not be merged: {exc} If the file is broken, delete "
            f"{INDEX_NAME} from {repo_id} and re-run the push (it then lists the adapters of this push only)."
        ) from exc
    return dict(entries) if previous.get("layout") == layout else {}


def _push_index(api: HfApi, collection: LocalCollection, repo_id: str, bases_folder: str, result: PushResult,
                entries: dict[str, dict[str, Any]]) -> None:
    """Commits the index, card and report: the last step, so they never list an adapter that is not there."""
    adapters = _previous_entries(api, repo_id, result.layout)
    for name, entry in entries.items():
        adapters[name] = {**entry, "cluster": collection.adapters[name].config.get("cluster"),
                          "bases_revision": result.bases_revision}
    index = {
        "format": INDEX_FORMAT,
        "format_version": 1,
        "layout": result.layout,
        "base_model": collection.bases_config.base_model_name_or_path,
        "bases": {"repo": repo_id, "subfolder": bases_folder or None, "revision": result.bases_revision,
                  "fingerprint": collection.fingerprint},
        "adapters": dict(sorted(adapters.items())),
    }
    bases_bytes = os.path.getsize(collection.bases_dir / BASES_WEIGHTS_NAME)
    card = collection_card(repo_id, collection.bases_config, bases_bytes, result.bases_revision, adapters,
                           collection.report, bases_folder or None)
    uploads = [Upload(INDEX_NAME, json.dumps(index, indent=2, sort_keys=True).encode()),
               Upload(CARD_NAME, card.encode("utf-8"))]
    if collection.report is not None:
        uploads.append(Upload(REPORT_NAME, collection.report.path))
    remote.commit(api, repo_id, remote.changed(api, repo_id, uploads), "Update JD-LoRA collection index and card")


def push_collection(
    collection_dir: str | os.PathLike,
    *,
    repo: Optional[str] = None,
    bases_repo: Optional[str] = None,
    adapter_repo: Optional[str] = None,
    adapters: Optional[Sequence[str]] = None,
    private: bool = False,
    token: Optional[str] = None,
    endpoint: Optional[str] = None,
    max_workers: int = 8,
    adapters_per_commit: int = 500,
    progress: bool = True,
) -> PushResult:
    """Pushes a compressed collection (`OUT/` of `peft-jd compress`) to the Hub.

    Args:
        collection_dir: Folder with `bases/`, `adapters/<name>/` and optionally `report.json`.
        repo: Single-repo layout: the repo that receives `bases/` and `adapters/<name>/`.
        bases_repo: One-repo-per-adapter layout: the repo that receives the bases.
        adapter_repo: One-repo-per-adapter layout: repo id template with `{name}`, e.g. `"org/{name}-jd"`.
        adapters: Push only these adapters (default: all of the collection).
        private: Create missing repos as private.
        token: Hub token; defaults to the usual huggingface_hub sources (`HF_TOKEN`, `hf auth login`).
        endpoint: Hub endpoint; defaults to `HF_ENDPOINT` / huggingface.co.
        max_workers: Adapter repos pushed in parallel (one-repo-per-adapter layout).
        adapters_per_commit: Adapters per commit in the single-repo layout.
        progress: Show progress bars.

    Returns:
        A `PushResult` with the pinned bases commit and what each adapter upload did.
    """
    layout = _layout(repo, bases_repo, adapter_repo)
    # Held for the whole push: uploads read the files, and `compress` / `add` must not replace them meanwhile.
    with _collection_lock(collection_dir):
        collection = read_collection(collection_dir, adapters)
        return _push(collection, layout, repo, bases_repo, adapter_repo, private, token, endpoint, max_workers,
                     adapters_per_commit, progress)


@contextlib.contextmanager
def _collection_lock(collection_dir: str | os.PathLike) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(writer_lock(collection_dir))
        except PermissionError as exc:
            # A read-only collection (a mounted volume) cannot be written by anyone else through peft-jd either.
            logger.warning("cannot take the writers' lock of %s (%s); pushing without it", collection_dir, exc)
        yield


def _push(collection: LocalCollection, layout: str, repo: Optional[str], bases_repo: Optional[str],
          adapter_repo: Optional[str], private: bool, token: Optional[str], endpoint: Optional[str], max_workers: int,
          adapters_per_commit: int, progress: bool) -> PushResult:
    api = HfApi(endpoint=endpoint, token=token)
    repo_ids = {n: adapter_repo.replace("{name}", n) for n in collection.adapters} if layout == "repos" else {}
    _check_repo_ids({"(bases)": bases_repo, **repo_ids} if layout == "repos" else {"(collection)": repo})
    _check_token(api)
    try:
        if layout == "repos":
            return _push_repos(api, collection, bases_repo, repo_ids, private, max_workers, progress)
        return _push_subfolders(api, collection, repo, private, adapters_per_commit, progress)
    except (HfHubHTTPError, httpx2.TransportError) as exc:
        raise PushError(
            f"push of {collection.root} to {bases_repo or repo} stopped: {type(exc).__name__}: {exc}. What reached "
            "the Hub is consistent (adapters are committed whole, pinned to committed bases; the index comes last). "
            "Re-run the same push to resume."
        ) from exc
