"""In-memory state of the local Hub: repositories, commits, file trees, git blobs, LFS objects and users.

Only what the Hub's HTTP API exposes is modelled: a commit is a full snapshot `{path: FileEntry}` (git trees are not
materialised), blob ids are real git blob sha1s, LFS files are stored under their sha256 with a git-lfs pointer blob
in the tree, exactly as the Hub reports them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import itertools
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional


LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub stores any file above 10 MB in LFS
DEFAULT_GITATTRIBUTES = """\
*.7z filter=lfs diff=lfs merge=lfs -text
*.arrow filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.gguf filter=lfs diff=lfs merge=lfs -text
*.gz filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.npz filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.parquet filter=lfs diff=lfs merge=lfs -text
*.pickle filter=lfs diff=lfs merge=lfs -text
*.pkl filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.tar filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
*.zst filter=lfs diff=lfs merge=lfs -text
"""


class HubError(Exception):
    """An error the Hub answers with `status`, `X-Error-Code` and `X-Error-Message` (see `hf_raise_for_status`)."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


class Unsupported(Exception):
    """A route, parameter or payload key the local Hub does not implement: answered 501 and recorded."""


def now_iso() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit. `lfs_oid` is the sha256 of an LFS file; `blob_id` is the git blob (or pointer) sha1."""

    path: str
    size: int
    blob_id: str
    last_commit: str
    lfs_oid: Optional[str] = None
    pointer_size: Optional[int] = None

    def etag(self) -> str:
        return self.lfs_oid or self.blob_id


@dataclass
class Commit:
    oid: str
    parents: tuple[str, ...]
    title: str
    message: str
    date: str
    author: str
    files: dict[str, FileEntry]


@dataclass
class User:
    name: str
    orgs: tuple[str, ...] = ()
    can_write: bool = True

    def owns(self, namespace: str) -> bool:
        return namespace == self.name or namespace in self.orgs


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)  # git blob sha1 -> content of regular files
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content of LFS objects

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str) -> Commit:
        """Branch, tag or full commit sha -> commit; raises `RevisionNotFound` like the Hub."""
        oid = self.branches.get(revision) or self.tags.get(revision)
        if oid is None and revision in self.commits:
            oid = revision
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]

    def content(self, entry: FileEntry) -> bytes:
        return self.lfs[entry.lfs_oid] if entry.lfs_oid else self.blobs[entry.blob_id]

    def history(self, head: str) -> list[Commit]:
        """Commits reachable from `head`, newest first (history is linear: no merges)."""
        out, oid = [], head
        while oid:
            commit = self.commits[oid]
            out.append(commit)
            oid = commit.parents[0] if commit.parents else None
        return out


def lfs_patterns(gitattributes: str) -> list[str]:
    return [line.split()[0] for line in gitattributes.splitlines() if "filter=lfs" in line and line.strip()]


def matches_any(path: str, patterns: list[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(path if "/" in p else name, p) for p in patterns)


class HubStore:
    """All repositories of the local Hub, guarded by one lock (requests arrive on many threads)."""

    def __init__(self):
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.users: dict[str, User] = {}
        self._counter = itertools.count()
        # Commit ids must never repeat across resets: processes cache bases by (repo, sha).
        self._salt = os.urandom(8).hex()

    # ------------------------------------------------------------------------------------------------ repositories
    def get(self, repo_type: str, repo_id: str, user: Optional[User], write: bool = False) -> Repo:
        """Returns a repo the caller may read (or write); otherwise answers like the Hub does."""
        repo = self.repos.get((repo_type, repo_id))
        visible = repo is not None and (not repo.private or (user is not None and user.owns(repo.namespace)))
        if not visible:
            # The Hub hides private repos behind the same answer as missing ones: 401 anonymous, 404 logged in.
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write:
            check_write(user, repo.namespace)
        return repo

    def create(self, repo_type: str, repo_id: str, private: bool, user: User) -> Repo:
        repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=now_iso())
        gitattributes = DEFAULT_GITATTRIBUTES.encode()
        self.commit(repo, "main", "initial commit", "", user, {".gitattributes": ("regular", gitattributes)}, set())
        self.repos[(repo_type, repo_id)] = repo
        return repo

    # ----------------------------------------------------------------------------------------------------- commits
    def new_oid(self, *parts: str) -> str:
        return hashlib.sha1("\n".join((self._salt, *parts, str(next(self._counter)))).encode()).hexdigest()

    def commit(
        self,
        repo: Repo,
        branch: str,
        title: str,
        message: str,
        user: User,
        additions: dict[str, tuple[str, object]],
        deletions: set[str],
        parent_commit: Optional[str] = None,
    ) -> Commit:
        """Applies additions (`path -> ("regular", bytes)` or `("lfs", (oid, size))`) and deletions to a branch."""
        head_oid = repo.branches.get(branch)
        if head_oid is None and repo.commits:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if parent_commit is not None and head_oid is not None and not head_oid.startswith(parent_commit):
            raise HubError(412, f"A commit has happened since {parent_commit}. Please refresh and try again.")
        files = dict(repo.commits[head_oid].files) if head_oid else {}
        for path in deletions:
            if path.endswith("/"):
                doomed = [p for p in files if p.startswith(path)]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            elif path in files:
                doomed = [path]
            else:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                files.pop(p)
        oid = self.new_oid(head_oid or "", title, *sorted(additions), *sorted(deletions))
        for path, (mode, payload) in additions.items():
            if mode == "regular":
                blob_id = git_blob_sha1(payload)
                repo.blobs[blob_id] = payload
                entry = FileEntry(path, len(payload), blob_id, oid)
            else:
                lfs_oid, size = payload
                if repo.lfs.get(lfs_oid) is None or len(repo.lfs[lfs_oid]) != size:
                    raise HubError(
                        422, f"Your push was rejected because an LFS pointer pointed to a file that does not exist "
                        f"({path}, oid {lfs_oid})", "BadRequest")
                pointer = lfs_pointer(lfs_oid, size)
                entry = FileEntry(path, size, git_blob_sha1(pointer), oid, lfs_oid, len(pointer))
            previous = files.get(path)
            same = previous is not None and previous.blob_id == entry.blob_id
            files[path] = previous if same else entry
        commit = Commit(oid, (head_oid,) if head_oid else (), title, message, now_iso(), user.name, files)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    def squash(self, repo: Repo, branch: str, message: str, user: User) -> Commit:
        """Replaces a branch's history by one commit holding its current tree; unreachable commits disappear."""
        head = repo.resolve(branch)
        oid = self.new_oid("squash", head.oid)
        files = {p: dataclasses.replace(e, last_commit=oid) for p, e in head.files.items()}
        commit = Commit(oid, (), message, "", now_iso(), user.name, files)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        refs = [*repo.branches.values(), *repo.tags.values()]
        reachable = {c.oid for ref in refs for c in repo.history(ref)}
        for stale in set(repo.commits) - reachable:
            del repo.commits[stale]
        return commit


def check_write(user: Optional[User], namespace: str) -> None:
    if user is None:
        raise HubError(401, "You must be authenticated to write to the Hub.")
    if not user.can_write or not user.owns(namespace):
        raise HubError(403, f"You don't have the rights to write to the namespace {namespace}")


def tree_oid(paths: list[str], files: dict[str, FileEntry]) -> str:
    return hashlib.sha1("".join(f"{p}:{files[p].blob_id}\n" for p in sorted(paths)).encode()).hexdigest()
