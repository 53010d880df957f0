"""Comparing local files with what a Hub repo already holds, committing only the difference, and finding the commit
that pins a repo's bases."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.sha import git_hash

from peft_jd.core import BASES_CONFIG_NAME, BASES_WEIGHTS_NAME

from .errors import PushError
from .local import verified_sha256


INDEX_NAME = "jd_collection.json"
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


def read_remote_json(api: HfApi, repo_id: str, path: str, revision: Optional[str] = None, **kwargs) -> Optional[dict]:
    """Downloads and decodes a JSON file of a repo; None if the repo has no such file."""
    try:
        local = api.hf_hub_download(repo_id, path, revision=revision, **kwargs)
    except EntryNotFoundError:
        return None
    with open(local, encoding="utf-8") as f:
        return json.load(f)
