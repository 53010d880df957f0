"""`LocalHub`: a stdlib-only HTTP server speaking the subset of the Hugging Face Hub API that huggingface_hub 2.4 uses
for repos, commits (regular and LFS uploads) and downloads. Anything else is answered 501 and recorded in
`unsupported`, so a test that strays outside the covered subset fails instead of passing against a fake."""

from __future__ import annotations

import os
import re
from typing import Optional

from .api import route_api
from .files import route_files
from .store import LFS_SIZE_THRESHOLD, HubError, HubStore, User
from .transport import HttpHub, Request, Response


WRITE_TOKEN = "hf_local_write_token"
READ_TOKEN = "hf_local_read_token"
OTHER_TOKEN = "hf_local_other_user_token"
# "regular": client with hf_xet enabled, server answers "regular" for every file; "lfs": HF_HUB_DISABLE_XET=1 and
# the server asks for LFS where the Hub does (batch -> PUT -> verify).
UPLOAD_MODES = ("regular", "lfs")


class LocalHub(HttpHub):
    """Local Hub server.

    Args:
        lfs_uploads: If True, files matching `.gitattributes` LFS patterns, binary files and files above 10 MB are
            uploaded through LFS (batch → PUT → verify), as on the Hub. If False every file is "regular": this is
            how tests run a client with hf_xet installed, which would otherwise use the Xet protocol (not served).
        multipart_chunk_size: If set, LFS objects larger than this are uploaded with the multipart transfer.
    """

    def __init__(self, lfs_uploads: bool = False, multipart_chunk_size: Optional[int] = None):
        super().__init__()
        self.secret = os.urandom(16)
        self.lfs_threshold = LFS_SIZE_THRESHOLD
        self.reset(lfs_uploads, multipart_chunk_size)

    def reset(self, lfs_uploads: bool = False, multipart_chunk_size: Optional[int] = None) -> None:
        """Forgets every repo, request, fault and recorded 501; sets the upload mode."""
        self.store = HubStore()
        self.tokens = {
            WRITE_TOKEN: User("alice", orgs=("org",), can_write=True),
            READ_TOKEN: User("alice", orgs=("org",), can_write=False),
            OTHER_TOKEN: User("mallory", orgs=(), can_write=True),
        }
        self.lfs_uploads = lfs_uploads
        self.multipart_chunk_size = multipart_chunk_size
        self.multipart: dict[str, dict] = {}
        self.page_size: Optional[int] = None  # overrides the Hub's page sizes (1000 / 50) to exercise pagination
        self.requests.clear()
        self.faults.clear()
        self.unsupported.clear()

    def route(self, request: Request) -> Response:
        authorization = request.headers.get("Authorization") or ""
        if authorization:
            token = authorization.removeprefix("Bearer ").strip()
            if token not in self.tokens:
                raise HubError(401, "Invalid credentials in Authorization header")
            request.user = self.tokens[token]
        if request.path.startswith("/api/"):
            return route_api(self, request)
        return route_files(self, request)

    # ------------------------------------------------------------------------------------------ test inspection
    def repo(self, repo_id: str, repo_type: str = "model"):
        return self.store.repos[(repo_type, repo_id)]

    def head(self, repo_id: str, repo_type: str = "model") -> str:
        return self.repo(repo_id, repo_type).branches["main"]

    def file_bytes(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        repo = self.repo(repo_id, repo_type)
        return repo.content(repo.resolve(revision).files[path])

    def uploaded_bytes(self) -> int:
        """Bytes received by the commit and LFS storage endpoints: what pushes actually transferred."""
        return sum(r.bytes_in for r in self.requests if _UPLOAD_PATHS.search(r.path))

    def commits(self, repo_id: str, repo_type: str = "model") -> int:
        """Number of commits on `main` (the repo's initial `.gitattributes` commit included)."""
        repo = self.repo(repo_id, repo_type)
        return len(repo.history(repo.branches["main"]))


_UPLOAD_PATHS = re.compile(r"^/api/\w+/[^/]+/[^/]+/commit/|^/__(upload|part)__/")
