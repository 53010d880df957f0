"""File routes of the local Hub: `resolve` downloads (regular files, LFS redirects to a CDN host), the git-lfs batch
API, signed storage uploads (single PUT and multipart) and LFS verify."""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from .store import HubError, Unsupported
from .transport import Request, Response, check_keys


if TYPE_CHECKING:
    from .app import LocalHub

_REPO = r"^/(?:(?P<type>datasets)/)?(?P<ns>[^/]+)/"
RESOLVE_RE = re.compile(_REPO + r"(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
LFS_RE = re.compile(_REPO + r"(?P<name>[^/]+?)\.git/info/lfs/objects/(?P<op>batch|verify)$")
STORAGE_RE = re.compile(r"^/__(?P<kind>cdn|upload|part|complete)__/(?P<key>.+)$")
LFS_JSON = "application/vnd.git-lfs+json"


def route_files(hub: LocalHub, req: Request) -> Response:
    if match := RESOLVE_RE.match(req.path):
        if req.method not in ("GET", "HEAD"):
            raise Unsupported(f"route {req.method} {req.path}")
        req.params(set())
        return resolve(hub, req, match["type"] or "model", f"{unquote(match['ns'])}/{unquote(match['name'])}",
                       unquote(match["rev"]), unquote(match["path"]))
    if (match := LFS_RE.match(req.path)) and req.method == "POST":
        repo_type, repo_id = match["type"] or "model", f"{unquote(match['ns'])}/{unquote(match['name'])}"
        return (lfs_batch if match["op"] == "batch" else lfs_verify)(hub, req, repo_type, repo_id)
    if match := STORAGE_RE.match(req.path):
        params = req.params({"sig"})
        if not hmac.compare_digest(params.get("sig", ""), sign(hub, match["kind"], match["key"])):
            raise HubError(403, "Request has expired or the signature does not match")
        storage = {("cdn", "GET"): cdn_get, ("upload", "PUT"): storage_put, ("part", "PUT"): part_put,
                   ("complete", "POST"): multipart_complete}
        handler = storage.get((match["kind"], req.method))
        if handler is None:
            raise Unsupported(f"route {req.method} {req.path}")
        return handler(hub, req, match["key"])
    raise Unsupported(f"route {req.method} {req.path}")


def sign(hub: LocalHub, kind: str, key: str) -> str:
    return hmac.new(hub.secret, f"{kind}:{key}".encode(), hashlib.sha256).hexdigest()[:32]


def signed_url(hub: LocalHub, base: str, kind: str, key: str) -> str:
    return f"{base}/__{kind}__/{key}?sig={sign(hub, kind, key)}"


def _ranged(req: Request, content: bytes, headers: dict) -> Response:
    """Serves `content`, honouring a `Range: bytes=start-[end]` header like the Hub and its CDN."""
    headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", **headers}
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("Range", ""))
    if not match:
        return Response(200, content, headers)
    start, end = int(match[1]), int(match[2]) if match[2] else len(content) - 1
    if start >= len(content):
        return Response(416, b"", {**headers, "Content-Range": f"bytes */{len(content)}"})
    headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
    return Response(206, content[start : end + 1], headers)


# ----------------------------------------------------------------------------------------------------- downloads
def resolve(hub: LocalHub, req: Request, repo_type: str, repo_id: str, revision: str, path: str) -> Response:
    with hub.store.lock:
        repo = hub.store.get(repo_type, repo_id, req.user)
        commit = repo.resolve(revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        content = repo.content(entry)
    headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{entry.etag()}"'}
    if entry.lfs_oid:
        key = f"{repo_type}/{repo_id}/{entry.lfs_oid}/{quote(path.rsplit('/', 1)[-1])}"
        location = signed_url(hub, hub.cdn_endpoint, "cdn", key)
        headers.update({"Location": location, "X-Linked-Etag": f'"{entry.lfs_oid}"', "X-Linked-Size": str(entry.size)})
        return Response(302, f"Found. Redirecting to {location}".encode(), headers)
    response = _ranged(req, content, headers)
    response.head_length = len(content)
    return response


def cdn_get(hub: LocalHub, req: Request, key: str) -> Response:
    repo_type, namespace, name, oid, _ = key.split("/", 4)
    with hub.store.lock:
        repo = hub.store.repos.get((repo_type, f"{namespace}/{name}"))
        content = repo.lfs.get(oid) if repo else None
    if content is None:
        raise HubError(404, "NoSuchKey")
    return _ranged(req, content, {"ETag": f'"{oid}"'})


# ------------------------------------------------------------------------------------------------------- uploads
def lfs_batch(hub: LocalHub, req: Request, repo_type: str, repo_id: str) -> Response:
    data = req.json({"operation", "transfers", "objects", "hash_algo", "ref"}, required={"operation", "objects"})
    if data["operation"] != "upload":
        raise Unsupported(f"LFS batch operation {data['operation']!r}")
    if data.get("hash_algo", "sha256") != "sha256":
        raise HubError(422, f"unsupported hash_algo {data['hash_algo']!r}")
    transfers = data.get("transfers") or ["basic"]
    chunk = hub.multipart_chunk_size
    with hub.store.lock:
        repo = hub.store.get(repo_type, repo_id, req.user, write=True)
        if data.get("ref"):
            check_keys(data["ref"], {"name"}, {"name"}, "LFS batch ref")
            repo.resolve(data["ref"]["name"])
        present = set(repo.lfs)
    multipart = bool(chunk) and "multipart" in transfers
    objects = []
    prefix = "" if repo_type == "model" else "datasets/"
    verify = {"href": f"{hub.endpoint}/{prefix}{repo_id}.git/info/lfs/objects/verify"}
    for obj in data["objects"]:
        check_keys(obj, {"oid", "size"}, {"oid", "size"}, "LFS batch object")
        oid, size = obj["oid"], obj["size"]
        if not re.fullmatch(r"[0-9a-f]{64}", oid):
            objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "invalid oid"}})
            continue
        answer = {"oid": oid, "size": size, "authenticated": True}
        if oid not in present:
            upload_key = f"{repo_type}/{repo_id}/{oid}/{size}"
            if multipart and size > chunk:
                upload_id = uuid.uuid4().hex
                hub.multipart[upload_id] = {"key": upload_key, "parts": {}}
                header = {"chunk_size": str(chunk)}
                for part in range(1, -(-size // chunk) + 1):
                    header[f"{part:05d}"] = signed_url(hub, hub.cdn_endpoint, "part", f"{upload_id}/{part}")
                upload = {"href": signed_url(hub, hub.endpoint, "complete", upload_id), "header": header}
            else:
                upload = {"href": signed_url(hub, hub.cdn_endpoint, "upload", upload_key)}
            answer["actions"] = {"upload": upload, "verify": verify}
        objects.append(answer)
    body = {"transfer": "multipart" if multipart else "basic", "objects": objects}
    return Response.json(body, headers={"Content-Type": LFS_JSON})


def _store_object(hub: LocalHub, key: str, content: bytes) -> None:
    repo_type, namespace, name, oid, size = key.split("/")
    if len(content) != int(size) or hashlib.sha256(content).hexdigest() != oid:
        raise HubError(400, f"uploaded content does not match oid {oid} / size {size}")
    with hub.store.lock:
        repo = hub.store.repos.get((repo_type, f"{namespace}/{name}"))
        if repo is None:
            raise HubError(404, "NoSuchBucket")
        repo.lfs[oid] = content


def storage_put(hub: LocalHub, req: Request, key: str) -> Response:
    _store_object(hub, key, req.body)
    return Response(200, b"", {"ETag": f'"{hashlib.md5(req.body).hexdigest()}"'})


def part_put(hub: LocalHub, req: Request, key: str) -> Response:
    upload_id, part = key.split("/")
    if upload_id not in hub.multipart:
        raise HubError(404, "NoSuchUpload")
    etag = f'"{hashlib.md5(req.body).hexdigest()}"'
    hub.multipart[upload_id]["parts"][int(part)] = (etag, req.body)
    return Response(200, b"", {"ETag": etag})


def multipart_complete(hub: LocalHub, req: Request, upload_id: str) -> Response:
    data = req.json({"oid", "parts"}, required={"oid", "parts"})
    pending = hub.multipart.pop(upload_id, None)
    if pending is None:
        raise HubError(404, "NoSuchUpload")
    chunks = []
    for part in data["parts"]:
        check_keys(part, {"partNumber", "etag"}, {"partNumber", "etag"}, "multipart completion part")
        etag, body = pending["parts"].get(part["partNumber"], (None, b""))
        if etag != part["etag"]:
            raise HubError(400, f"part {part['partNumber']}: etag mismatch")
        chunks.append(body)
    _store_object(hub, pending["key"], b"".join(chunks))
    return Response.json({})


def lfs_verify(hub: LocalHub, req: Request, repo_type: str, repo_id: str) -> Response:
    data = req.json({"oid", "size"}, required={"oid", "size"})
    with hub.store.lock:
        repo = hub.store.get(repo_type, repo_id, req.user, write=True)
        content = repo.lfs.get(data["oid"])
    if content is None or len(content) != data["size"]:
        raise HubError(404, f"LFS object {data['oid']} was not uploaded")
    return Response.json({}, headers={"Content-Type": LFS_JSON})
