"""`/api/...` routes of the local Hub: repos, info, tree, paths-info, refs, commits, preupload, commit, branches,
tags, super-squash, validate-yaml, whoami. Shapes follow what huggingface_hub 2.4 parses (see its `hf_api.py`)."""

from __future__ import annotations

import base64
import json
import re
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlencode

from .store import HubError, Repo, Unsupported, lfs_patterns, matches_any, tree_oid
from .transport import Request, Response, check_keys


if TYPE_CHECKING:
    from .app import LocalHub

REPO_API_RE = re.compile(r"^/api/(?P<type>models|datasets)/(?P<ns>[^/]+)/(?P<name>[^/]+)(?P<rest>/.*)?$")
REPO_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
PAGE_SIZE, EXPANDED_PAGE_SIZE, COMMITS_PAGE_SIZE = 1000, 50, 50


def route_api(hub: LocalHub, req: Request) -> Response:
    simple = {
        ("POST", "/api/repos/create"): create_repo,
        ("DELETE", "/api/repos/delete"): delete_repo,
        ("POST", "/api/validate-yaml"): validate_yaml,
        ("GET", "/api/whoami-v2"): whoami,
        ("GET", "/api/agent-harnesses"): agent_harnesses,
    }
    if (req.method, req.path) in simple:
        return simple[(req.method, req.path)](hub, req)
    match = REPO_API_RE.match(req.path)
    if match is None:
        raise Unsupported(f"route {req.method} {req.path}")
    repo_type = match["type"][:-1]
    repo_id = f"{unquote(match['ns'])}/{unquote(match['name'])}"
    segments = [unquote(s) for s in (match["rest"] or "").split("/")[1:]]
    action = segments[0] if segments else ""
    handlers = {
        ("GET", ""): repo_info,
        ("GET", "revision"): repo_info,
        ("GET", "tree"): tree,
        ("POST", "paths-info"): paths_info,
        ("GET", "refs"): refs,
        ("GET", "commits"): commits,
        ("POST", "preupload"): preupload,
        ("POST", "commit"): commit,
        ("POST", "branch"): create_branch,
        ("DELETE", "branch"): delete_ref,
        ("POST", "tag"): create_tag,
        ("DELETE", "tag"): delete_ref,
        ("POST", "super-squash"): super_squash,
    }
    handler = handlers.get((req.method, action))
    if handler is None:
        raise Unsupported(f"route {req.method} {req.path}")
    return handler(hub, req, repo_type, repo_id, segments)


# ---------------------------------------------------------------------------------------------------- repositories
def _repo_url(hub: LocalHub, repo_type: str, repo_id: str) -> str:
    return f"{hub.endpoint}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"


def create_repo(hub: LocalHub, req: Request) -> Response:
    data = req.json({"name", "organization", "visibility", "type"}, required={"name"})
    repo_type = data.get("type") or "model"
    if repo_type not in ("model", "dataset"):
        raise Unsupported(f"repo type {repo_type!r}")
    if not REPO_NAME_RE.match(data["name"]):
        raise HubError(400, f"Invalid repo name {data['name']!r}")
    if req.user is None:
        raise HubError(401, "You must be authenticated to create a repo.")
    namespace = data.get("organization") or req.user.name
    if not (req.user.can_write and req.user.owns(namespace)):
        raise HubError(403, f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"')
    repo_id = f"{namespace}/{data['name']}"
    url = _repo_url(hub, repo_type, repo_id)
    with hub.store.lock:
        if (repo_type, repo_id) in hub.store.repos:
            return Response.json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
        hub.store.create(repo_type, repo_id, data.get("visibility") == "private", req.user)
    return Response.json({"url": url, "name": repo_id, "id": repo_id})


def delete_repo(hub: LocalHub, req: Request) -> Response:
    data = req.json({"name", "organization", "type"}, required={"name"})
    namespace = data.get("organization") or (req.user.name if req.user else "")
    key = (data.get("type") or "model", f"{namespace}/{data['name']}")
    with hub.store.lock:
        hub.store.get(*key, req.user, write=True)
        del hub.store.repos[key]
    return Response.json({})


def _file_json(entry, expand: bool, repo: Repo) -> dict:
    out = {"type": "file", "oid": entry.blob_id, "size": entry.size, "path": entry.path}
    if entry.lfs_oid:
        out["lfs"] = {"oid": entry.lfs_oid, "size": entry.size, "pointerSize": entry.pointer_size}
    if expand:
        out["lastCommit"] = _last_commit_json(repo, entry.last_commit)
    return out


def _last_commit_json(repo: Repo, oid: str) -> dict:
    commit = repo.commits.get(oid)
    return {"id": oid, "title": commit.title if commit else "", "date": commit.date if commit else ""}


def _folder_json(path: str, files: dict, expand: bool, repo: Repo) -> dict:
    inside = [p for p in files if p.startswith(path + "/")]
    out = {"type": "directory", "oid": tree_oid(inside, files), "size": 0, "path": path}
    if expand:
        newest = max((files[p] for p in inside), key=lambda e: repo.commits[e.last_commit].date if
                     e.last_commit in repo.commits else "")
        out["lastCommit"] = _last_commit_json(repo, newest.last_commit)
    return out


def repo_info(hub: LocalHub, req: Request, repo_type: str, repo_id: str, segments: list[str]) -> Response:
    params = req.params({"blobs", "securityStatus", "expand"})
    if "expand" in params:
        raise Unsupported("repo info with `expand`")
    if segments and len(segments) != 2:
        raise Unsupported(f"route {req.method} {req.path}")
    with hub.store.lock:
        repo = hub.store.get(repo_type, repo_id, req.user)
        head = repo.resolve(segments[1] if segments else "main")
        blobs = params.get("blobs", "").lower() == "true"
        siblings = []
        for path in sorted(head.files):
            sibling = {"rfilename": path}
            entry = head.files[path]
            if blobs:
                sibling.update(size=entry.size, blobId=entry.blob_id)
                if entry.lfs_oid:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.lfs_oid, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        data = {
            "_id": repo_id, "id": repo_id, "author": repo.namespace, "sha": head.oid, "lastModified": head.date,
            "createdAt": repo.created_at, "private": repo.private, "gated": False, "disabled": False, "downloads": 0,
            "likes": 0, "tags": [], "siblings": siblings,
        }
        if params.get("securityStatus", "").lower() == "true":
            data["securityRepoStatus"] = {"scansDone": True, "filesWithIssues": []}
    return Response.json(data)


def _listing(files: dict, prefix: str, recursive: bool) -> tuple[list[str], list[str]]:
    """(folders, files) under `prefix` ("" for the root): direct children, or all descendants if recursive."""
    start = prefix + "/" if prefix else ""
    folders, found = set(), []
    for path in files:
        if not path.startswith(start):
            continue
        parts = path[len(start):].split("/")
        if recursive:
            folders.update(start + "/".join(parts[:i]) for i in range(1, len(parts)))
            found.append(path)
        elif len(parts) == 1:
            found.append(path)
        else:
            folders.add(start + parts[0])
    return sorted(folders), sorted(found)


def _paginate(hub: LocalHub, req: Request, items: list, params: dict, page_size: int) -> Response:
    page_size = hub.page_size or page_size
    try:
        offset = int(params.get("cursor") or 0)
    except ValueError:
        raise HubError(400, "invalid cursor") from None
    page = items[offset : offset + page_size]
    headers = {}
    if offset + page_size < len(items):
        query = urlencode({**{k: v for k, v in params.items() if k != "cursor"}, "cursor": offset + page_size})
        headers["Link"] = f'<{hub.endpoint}{req.path}?{query}>; rel="next"'
    return Response.json(page, headers=headers)


def tree(hub: LocalHub, req: Request, repo_type: str, repo_id: str, segments: list[str]) -> Response:
    params = req.params({"recursive", "expand", "cursor"})
    if len(segments) < 2:
        raise Unsupported(f"route {req.method} {req.path}")
    prefix = "/".join(segments[2:]).strip("/")
    recursive = params.get("recursive", "false").lower() == "true"
    expand = params.get("expand", "false").lower() == "true"
    with hub.store.lock:
        repo = hub.store.get(repo_type, repo_id, req.user)
        files = repo.resolve(segments[1]).files
        folders, found = _listing(files, prefix, recursive)
        if prefix and not folders and not found:
            raise HubError(404, f"Entry not found: {prefix}", "EntryNotFound")
        items = [_folder_json(f, files, expand, repo) for f in folders]
        items += [_file_json(files[p], expand, repo) for p in found]
    return _paginate(hub, req, items, params, EXPANDED_PAGE_SIZE if expand else PAGE_SIZE)


def paths_info(hub: LocalHub, req: Request, repo_type: str, repo_id: str, segments: list[str]) -> Response:
    req.params(set())
    form = req.form({"paths", "expand"})
    expand = form.get("expand", ["false"])[-1].lower() == "true"
    with hub.store.lock:
        repo = hub.store.get(repo_type, repo_id, req.user)
        files = repo.resolve(segments[1]).files
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in files:
                out.append(_file_json(files[path], expand, repo))
            elif any(p.startswith(path + "/") for p in files):
                out.append(_folder_json(path, files, expand, repo))
    return Response.json(out)


def refs(hub: LocalHub, req: Request, repo_type: str, repo_id: str, segments: list[str]) -> Response:
    params = req.params({"include_prs"})
    with hub.store.lock:
        repo = hub.store.get(repo_type, repo_id, req.user)
        data = {
            "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in repo.branches.items()],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": o} for n, o in repo.tags.items()],
            "converts": [],
        }
    if params.get("include_prs"):
        data["pullRequests"] = []
    return Response.json(data)


def commits(hub: LocalHub, req: Request, repo_type: str, repo_id: str, segments: list[str]) -> Response:
    params = req.params({"expand[]", "cursor"})
    formatted = params.get("expand[]") == "formatted"
    with hub.store.lock:
        repo = hub.store.get(repo_type, repo_id, req.user)
        items = []
        for c in repo.history(repo.resolve(segments[1]).oid):
            item = {"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
                    "authors": [{"user": c.author, "avatar": ""}]}
            if formatted:
                item["formatted"] = {"title": c.title, "message": c.message}
            items.append(item)
    return _paginate(hub, req, items, params, COMMITS_PAGE_SIZE)


# ----------------------------------------------------------------------------------------------------- uploading
def preupload(hub: LocalHub, req: Request, repo_type: str, repo_id: str, segments: list[str]) -> Response:
    if req.params({"create_pr"}).get("create_pr"):
        raise Unsupported("pull requests (create_pr)")
    data = req.json({"files", "gitIgnore"}, required={"files"})
    ignore = [line.strip() for line in (data.get("gitIgnore") or "").splitlines() if line.strip()]
    with hub.store.lock:
        repo = hub.store.get(repo_type, repo_id, req.user, write=True)
        head = repo.resolve(segments[1])
        attributes = head.files.get(".gitattributes")
        patterns = lfs_patterns(repo.content(attributes).decode()) if attributes else []
        out = []
        for item in data["files"]:
            check_keys(item, {"path", "sample", "size"}, {"path", "sample", "size"}, "preupload file")
            sample = base64.b64decode(item["sample"])
            lfs = hub.lfs_uploads and (
                matches_any(item["path"], patterns) or item["size"] > hub.lfs_threshold or b"\0" in sample
            )
            answer = {"path": item["path"], "uploadMode": "lfs" if lfs else "regular",
                      "shouldIgnore": matches_any(item["path"], ignore)}
            existing = head.files.get(item["path"])
            if existing is not None:
                answer["oid"] = existing.lfs_oid or existing.blob_id
            out.append(answer)
    return Response.json({"files": out, "commitOid": head.oid})


def _parse_ndjson(body: bytes) -> tuple[dict, dict, set[str]]:
    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    if not lines or lines[0].get("key") != "header":
        raise HubError(400, "commit payload must start with a header line")
    additions: dict = {}
    deletions: set[str] = set()
    allowed = {
        "header": {"summary", "description", "parentCommit"},
        "file": {"content", "path", "encoding"},
        "lfsFile": {"path", "algo", "oid", "size"},
        "deletedFile": {"path"},
        "deletedFolder": {"path"},
    }
    for line in lines:
        check_keys(line, {"key", "value"}, {"key", "value"}, "commit line")
        key, value = line["key"], line["value"]
        if key not in allowed:
            raise Unsupported(f"commit operation {key!r}")
        check_keys(value, allowed[key], set(), f"commit {key} line")
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise Unsupported(f"commit file encoding {value['encoding']!r}")
            additions[value["path"]] = ("regular", base64.b64decode(value["content"]))
        elif key == "lfsFile":
            if value.get("algo", "sha256") != "sha256":
                raise HubError(400, f"unsupported LFS algo {value['algo']!r}")
            additions[value["path"]] = ("lfs", (value["oid"], value.get("size")))
        elif key == "deletedFile":
            deletions.add(value["path"])
        elif key == "deletedFolder":
            deletions.add(value["path"].rstrip("/") + "/")
    return lines[0]["value"], additions, deletions


def commit(hub: LocalHub, req: Request, repo_type: str, repo_id: str, segments: list[str]) -> Response:
    params = req.params({"create_pr", "hot_reload"})
    if params.get("create_pr") or params.get("hot_reload"):
        raise Unsupported("pull requests / hot reload on commit")
    if "ndjson" not in req.headers.get("Content-Type", ""):
        raise Unsupported(f"commit body of type {req.headers.get('Content-Type')!r} (only NDJSON)")
    header, additions, deletions = _parse_ndjson(req.body)
    with hub.store.lock:
        repo = hub.store.get(repo_type, repo_id, req.user, write=True)
        for path, (mode, payload) in additions.items():
            if mode == "lfs" and payload[1] is None:
                payload = additions[path] = ("lfs", (payload[0], len(repo.lfs.get(payload[0], b""))))
            if mode == "regular" and hub.lfs_uploads and (b"\0" in payload or len(payload) > hub.lfs_threshold):
                raise HubError(400, f"Your push was rejected because it contains binary files ({path}); "
                               "binary files must be uploaded with LFS.")
        result = hub.store.commit(repo, segments[1], header.get("summary", ""), header.get("description", ""),
                                  req.user, additions, deletions, header.get("parentCommit"))
    url = f"{_repo_url(hub, repo_type, repo_id)}/commit/{result.oid}"
    return Response.json({"success": True, "commitOid": result.oid, "commitUrl": url, "hookOutput": ""})


# ------------------------------------------------------------------------------------------------ refs & history
def create_branch(hub: LocalHub, req: Request, repo_type: str, repo_id: str, segments: list[str]) -> Response:
    data = req.json({"startingPoint", "emptyBranch", "overwrite"})
    if data.get("emptyBranch") or data.get("overwrite"):
        raise Unsupported("empty or overwriting branches")
    with hub.store.lock:
        repo = hub.store.get(repo_type, repo_id, req.user, write=True)
        if segments[1] in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{segments[1]}")
        repo.branches[segments[1]] = repo.resolve(data.get("startingPoint") or "main").oid
    return Response.json({})


def create_tag(hub: LocalHub, req: Request, repo_type: str, repo_id: str, segments: list[str]) -> Response:
    data = req.json({"tag", "message"}, required={"tag"})
    with hub.store.lock:
        repo = hub.store.get(repo_type, repo_id, req.user, write=True)
        if data["tag"] in repo.tags:
            raise HubError(409, f"Reference already exists: refs/tags/{data['tag']}")
        repo.tags[data["tag"]] = repo.resolve(segments[1]).oid
    return Response.json({})


def delete_ref(hub: LocalHub, req: Request, repo_type: str, repo_id: str, segments: list[str]) -> Response:
    with hub.store.lock:
        repo = hub.store.get(repo_type, repo_id, req.user, write=True)
        refs_of_kind = repo.branches if segments[0] == "branch" else repo.tags
        if segments[1] not in refs_of_kind or segments[1] == "main" and segments[0] == "branch":
            raise HubError(404, f"Invalid rev id: {segments[1]}", "RevisionNotFound")
        del refs_of_kind[segments[1]]
    return Response.json({})


def super_squash(hub: LocalHub, req: Request, repo_type: str, repo_id: str, segments: list[str]) -> Response:
    data = req.json({"message"})
    with hub.store.lock:
        repo = hub.store.get(repo_type, repo_id, req.user, write=True)
        hub.store.squash(repo, segments[1], data.get("message") or "Super-squash", req.user)
    return Response.json({})


# ---------------------------------------------------------------------------------------------------------- misc
def validate_yaml(hub: LocalHub, req: Request) -> Response:
    """Structural check of the README front matter (no YAML parser in the stdlib): closed block, `key: value` lines."""
    data = req.json({"content", "repoType"}, required={"content"})
    errors = []
    lines = data["content"].splitlines()
    if lines and lines[0].strip() == "---":
        end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
        if end is None:
            errors.append({"message": "metadata block opened with '---' is never closed"})
        else:
            for line in lines[1:end]:
                if line.strip() and not line[0].isspace() and not line.startswith(("-", "#")) and ":" not in line:
                    errors.append({"message": f"invalid metadata line: {line!r}"})
    return Response.json({"errors": errors, "warnings": []}, 400 if errors else 200)


def whoami(hub: LocalHub, req: Request) -> Response:
    req.params(set())
    if req.user is None:
        raise HubError(401, "Invalid credentials in Authorization header")
    user = req.user
    return Response.json({
        "type": "user", "id": user.name, "name": user.name, "fullname": user.name,
        "orgs": [{"type": "org", "name": org} for org in user.orgs],
        "auth": {"type": "access_token",
                 "accessToken": {"displayName": "local", "role": "write" if user.can_write else "read"}},
    })


def agent_harnesses(hub: LocalHub, req: Request) -> Response:
    req.params(set())
    return Response.json({"standardEnvVars": [], "harnesses": {}})
