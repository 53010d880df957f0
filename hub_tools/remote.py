"""Comparing local files with what a Hub repo already holds, committing only the difference, and finding the commit
that pins a repo's bases."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import validate_repo_id
from huggingface_hub.utils.sha import git_hash

from peft_jd.core import (
    BASES_CONFIG_NAME,
    BASES_WEIGHTS_NAME,
    JDLoraError,
    check_hub_path,
    check_path_component,
    hub_download,
)

from .errors import PullError, PushError
from .local import verified_sha256


INDEX_FORMAT = "peft-jd-hub-collection"
PATHS_PER_REQUEST = 500  # the Hub accepts at most 1000 paths per paths-info call


@dataclass(frozen=True)
class Upload:
    """A file to put at `path_in_repo`: in-memory bytes or a local file."""

    path_in_repo: str
    source: Union[bytes, Path]

    def sha256(self) -> str:
        if isinstance(self.source, bytes):
            return hashlib.sha256(self.source).hexdigest()
        return verified_sha256(self.source)

    def git_blob_sha1(self) -> str:
        """The git object id of the content: what the Hub reports as `oid` for a non-LFS file."""
        if isinstance(self.source, bytes):
            return git_hash(self.source)
        # Streamed (same digest as `git_hash`): a bases file does not have to fit in memory.
        digest = hashlib.sha1(b"blob %d\0" % os.path.getsize(self.source))
        with open(self.source, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        return digest.hexdigest()

    def matches(self, remote: Optional[RepoFile]) -> bool:
        if remote is None:
            return False
        if remote.lfs is not None:
            return remote.lfs.sha256 == self.sha256()
        return remote.blob_id == self.git_blob_sha1()

    def operation(self) -> CommitOperationAdd:
        source = self.source if isinstance(self.source, bytes) else str(self.source)
        return CommitOperationAdd(path_in_repo=self.path_in_repo, path_or_fileobj=source)


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def remote_files(
    api: HfApi, repo_id: str, paths: Sequence[str], revision: Optional[str] = None, expand: bool = False
) -> dict[str, RepoFile]:
    """The files among `paths` that exist in the repo at `revision` (folders and missing paths are left out)."""
    out = {}
    for chunk in _chunks(list(paths), PATHS_PER_REQUEST):
        for item in api.get_paths_info(repo_id, list(chunk), revision=revision, expand=expand):
            if isinstance(item, RepoFile):
                out[item.path] = item
    return out


def changed(api: HfApi, repo_id: str, uploads: Sequence[Upload], revision: Optional[str] = None) -> list[Upload]:
    """The uploads whose content differs from (or is absent in) the repo."""
    remote = remote_files(api, repo_id, [u.path_in_repo for u in uploads], revision)
    return [u for u in uploads if not u.matches(remote.get(u.path_in_repo))]


def commit(api: HfApi, repo_id: str, uploads: Sequence[Upload], message: str) -> Optional[str]:
    """Commits `uploads` in one commit; returns its sha, or None when there is nothing to upload."""
    if not uploads:
        return None
    return api.create_commit(repo_id, [u.operation() for u in uploads], commit_message=message).oid


def bases_pin(api: HfApi, repo_id: str, folder: str = "") -> str:
    """The commit that last changed the bases files in `folder`: the bases revision adapters pin.

    Unlike the head of the branch, it does not move when other files (cards, adapters, the index) are committed, so
    re-pushing an unchanged collection rewrites no adapter config.
    """
    prefix = f"{folder}/" if folder else ""
    paths = [prefix + BASES_CONFIG_NAME, prefix + BASES_WEIGHTS_NAME]
    head = remote_files(api, repo_id, paths, expand=True)
    if set(head) != set(paths):
        missing = sorted(set(paths) - set(head))
        raise PushError(f"{repo_id} lacks {missing} right after the bases upload; retry the push.")
    head_blobs = {p: e.blob_id for p, e in head.items()}
    candidates = list(dict.fromkeys(head[p].last_commit.oid for p in reversed(paths)))
    if len(candidates) == 1:
        return candidates[0]
    # The two files last changed in different commits: the newer one holds both current files.
    for oid in candidates:
        if {p: e.blob_id for p, e in remote_files(api, repo_id, paths, revision=oid).items()} == head_blobs:
            return oid
    raise PushError(f"could not find the commit of {repo_id} that holds the current bases; retry the push.")


def download_optional(repo_id: str, path: str, revision: Optional[str] = None, **hub_kwargs) -> Optional[str]:
    """Local path of a file of a repo (through `peft_jd.core.hub_download`), or None if the repo has no such file.

    Any other failure (missing repo or revision, network, offline and not cached) raises `PullError`.
    """
    try:
        return hub_download(repo_id, [path], revision=revision, what="collection", error_cls=PullError,
                            **hub_kwargs)[0]
    except PullError as exc:
        cause = exc.__cause__
        if isinstance(cause, EntryNotFoundError) and not isinstance(cause, LocalEntryNotFoundError):
            return None
        raise


def decode_json(local_path: str, where: str) -> Any:
    """Decodes a downloaded JSON file; `PullError` naming `where` (repo/path) when it is not UTF-8 JSON."""
    try:
        with open(local_path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PullError(f"{where} is not a JSON file ({exc}); it was not written by `peft-jd push`. Re-push the "
                        "collection (or fix the file on the Hub).") from exc


def read_remote_json(repo_id: str, path: str, revision: Optional[str] = None, **hub_kwargs) -> Optional[Any]:
    """Downloads and decodes a JSON file of a repo; None if the repo has no such file (`PullError` if unreadable)."""
    local = download_optional(repo_id, path, revision, **hub_kwargs)
    return None if local is None else decode_json(local, f"{repo_id}/{path}")


def _index_error(where: str, problem: str) -> PullError:
    return PullError(f"{where}: {problem}. It is not a `peft-jd push` index (or was tampered with); no adapter was "
                     "downloaded and nothing was written. Re-push the collection with `peft-jd push`.")


def parse_index(index: Any, where: str) -> dict[str, dict[str, Any]]:
    """The checked adapter entries of a `jd_collection.json`: name → `{"repo", "subfolder", "cluster",
    "bases_revision"}`.

    Names become folder names when pulled and subfolders paths in the Hub cache, so both are checked here, once, with
    the collection's name rule (`peft_jd.core.check_path_component`); anything else raises `PullError` naming `where`.
    """
    if not isinstance(index, dict):
        raise _index_error(where, f"the index must be a JSON object, not {type(index).__name__}")
    for key in ("layout", "base_model"):
        if index.get(key) is not None and not isinstance(index[key], str):
            raise _index_error(where, f"`{key}` must be a string, not {index[key]!r}")
    if index.get("bases") is not None and not isinstance(index["bases"], dict):
        raise _index_error(where, f"`bases` must be an object, not {type(index['bases']).__name__}")
    adapters = index.get("adapters")
    if adapters is None:
        adapters = {}
    if not isinstance(adapters, dict):
        raise _index_error(where, f"`adapters` must be an object (name → entry), not {type(adapters).__name__}")
    return {name: _index_entry(name, entry, where) for name, entry in adapters.items()}


def _index_entry(name: str, entry: Any, where: str) -> dict[str, Any]:
    try:
        check_path_component(name, "adapter name")
    except JDLoraError as exc:
        raise _index_error(where, str(exc).rstrip(".")) from None
    if not isinstance(entry, dict):
        raise _index_error(where, f"the entry of adapter {name!r} must be an object, not {type(entry).__name__}")
    repo, subfolder, revision = entry.get("repo"), entry.get("subfolder"), entry.get("bases_revision")
    try:
        validate_repo_id(repo)
    except (HFValidationError, TypeError) as exc:
        raise _index_error(where, f"adapter {name!r} has repo {repo!r}, not a Hub repo id ({exc})") from None
    try:
        subfolder = check_subfolder(subfolder, f"subfolder of adapter {name!r}")
        check_hub_path(revision if isinstance(revision, str) else None, f"bases revision of adapter {name!r}")
    except JDLoraError as exc:
        raise _index_error(where, str(exc).rstrip(".")) from None
    if revision is not None and not isinstance(revision, str):
        raise _index_error(where, f"adapter {name!r} has bases_revision {revision!r}, not a commit sha")
    return {**entry, "repo": repo, "subfolder": subfolder}


def check_subfolder(subfolder: Any, what: str = "subfolder") -> Optional[str]:
    """A Hub subfolder of a JD-LoRA repo: `/`-separated parts that each follow the collection's name rule."""
    if subfolder is None or subfolder == "":
        return None
    if not isinstance(subfolder, str) or subfolder.startswith("/"):
        raise PullError(f"{what} {subfolder!r} must be a relative path inside the repo (e.g. 'adapters/task-0').")
    for part in subfolder.rstrip("/").split("/"):
        try:
            check_path_component(part, f"{what} part")
        except JDLoraError as exc:
            raise PullError(f"{what} {subfolder!r}: {exc}") from None
    return subfolder.rstrip("/")
