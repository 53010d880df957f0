"""Contract tests of the local Hub server, driven only through public huggingface_hub calls.

They pin down what hub_tools relies on: repo creation (incl. `exist_ok` via the 409 body), uploads both ways
huggingface_hub 2.x sends them (regular with hf_xet enabled; LFS batch → PUT → verify with Xet disabled), downloads
(`resolve` metadata, LFS redirects), typed errors, pinned-sha immutability, refs, pagination and auth.
"""

from __future__ import annotations

import hashlib

import pytest
from hub_server import OTHER_TOKEN, READ_TOKEN, UPLOAD_MODES
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


pytest_plugins = ["hub_server.fixtures"]

BINARY = bytes(range(256)) * 20  # has NUL bytes: a binary file, LFS on the real Hub
CARD = "---\nlibrary_name: peft\ntags:\n- jdlora\n---\n\n# card\n"


def _folder(tmp_path, weights: bytes = BINARY, text: str = '{"a": 1}'):
    folder = tmp_path / "upload"
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "sub" / "weights.safetensors").write_bytes(weights)
    (folder / "config.json").write_text(text)
    (folder / "README.md").write_text(CARD)
    return folder


def _status(exc_info) -> int:
    return exc_info.value.response.status_code


def test_create_repo_exist_ok_and_private_visibility(hub):
    api = HfApi()
    url = api.create_repo("org/repo")
    assert url.repo_id == "org/repo" and url == f"{hub.endpoint}/org/repo"
    assert api.create_repo("org/repo", exist_ok=True) == url  # read from the 409 body
    with pytest.raises(HfHubHTTPError) as exc_info:
        api.create_repo("org/repo")
    assert _status(exc_info) == 409

    api.create_repo("org/secret", private=True)
    assert api.model_info("org/secret").private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("org/secret")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=OTHER_TOKEN).model_info("org/secret")
    assert HfApi(token=False).model_info("org/repo").id == "org/repo"

    api.delete_repo("org/repo")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/repo")


@pytest.mark.parametrize("hub", UPLOAD_MODES, indirect=True)
def test_upload_folder_round_trip(hub, tmp_path):
    api = HfApi()
    api.create_repo("org/up")
    info = api.upload_folder(repo_id="org/up", folder_path=_folder(tmp_path))
    assert hub.head("org/up") == info.oid

    tree = {f.path: f for f in api.list_repo_tree("org/up", recursive=True) if hasattr(f, "size")}
    weights = tree["sub/weights.safetensors"]
    sha256 = hashlib.sha256(BINARY).hexdigest()
    uploaded_via_lfs = hub.count("PUT", r"^/__upload__/") == 1 and hub.count("POST", r"lfs/objects/verify$") == 1
    if hub.lfs_uploads:
        assert weights.lfs is not None and weights.lfs.sha256 == sha256 and uploaded_via_lfs
    else:
        assert weights.lfs is None and hub.count("PUT", r".") == 0 and not hub.count("POST", r"lfs/objects/batch")
    assert tree["config.json"].lfs is None

    metadata = get_hf_file_metadata(hf_hub_url("org/up", "sub/weights.safetensors"))
    assert metadata.commit_hash == info.oid and metadata.size == len(BINARY)
    expected_etag = sha256 if hub.lfs_uploads else hashlib.sha1(b"blob %d\0" % len(BINARY) + BINARY).hexdigest()
    assert metadata.etag == expected_etag

    snapshot = snapshot_download("org/up")
    assert (tmp_path / "upload" / "sub" / "weights.safetensors").read_bytes() == \
        open(f"{snapshot}/sub/weights.safetensors", "rb").read()
    assert open(hf_hub_download("org/up", "config.json"), encoding="utf-8").read() == '{"a": 1}'


@pytest.mark.parametrize("hub", UPLOAD_MODES, indirect=True)
def test_unchanged_upload_makes_no_commit(hub, tmp_path):
    api = HfApi()
    api.create_repo("org/same")
    folder = _folder(tmp_path)
    first = api.upload_folder(repo_id="org/same", folder_path=folder)
    commits, uploaded = hub.commits("org/same"), hub.uploaded_bytes()
    second = api.upload_folder(repo_id="org/same", folder_path=folder)
    assert second.oid == first.oid
    assert hub.commits("org/same") == commits and hub.uploaded_bytes() == uploaded


@pytest.mark.parametrize("hub", ["lfs"], indirect=True)
def test_lfs_multipart_upload(hub, tmp_path):
    hub.multipart_chunk_size = 1000
    api = HfApi()
    api.create_repo("org/multi")
    payload = BINARY[:4500]
    api.upload_file(path_or_fileobj=payload, path_in_repo="big.safetensors", repo_id="org/multi")
    assert hub.count("PUT", r"^/__part__/") == 5 and hub.count("POST", r"^/__complete__/") == 1
    assert open(hf_hub_download("org/multi", "big.safetensors"), "rb").read() == payload


def test_pinned_sha_is_immutable(hub, tmp_path):
    api = HfApi()
    api.create_repo("org/pin")
    v1 = api.upload_folder(repo_id="org/pin", folder_path=_folder(tmp_path, text="v1")).oid
    v2 = api.upload_folder(repo_id="org/pin", folder_path=_folder(tmp_path, weights=BINARY[::-1], text="v2")).oid
    api.create_commit("org/pin", [CommitOperationDelete("config.json")], commit_message="drop config")
    assert v1 != v2
    assert open(hf_hub_download("org/pin", "config.json", revision=v1)).read() == "v1"
    assert open(hf_hub_download("org/pin", "config.json", revision=v2)).read() == "v2"
    assert open(hf_hub_download("org/pin", "sub/weights.safetensors", revision=v1), "rb").read() == BINARY
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/pin", "config.json")
    assert api.model_info("org/pin", revision=v1).sha == v1
    assert [c.commit_id for c in api.list_repo_commits("org/pin")][1:3] == [v2, v1]


def test_typed_errors(hub, tmp_path):
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    api.create_repo("org/err")
    old = api.upload_folder(repo_id="org/err", folder_path=_folder(tmp_path)).oid
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/err", "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/err", revision="f" * 40)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/err", "nope.json")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("org/err", revision="no-such-branch")

    api.super_squash_history("org/err")
    new = api.model_info("org/err").sha
    assert new != old and open(hf_hub_download("org/err", "config.json", revision=new)).read() == '{"a": 1}'
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/err", "config.json", revision=old, force_download=True)


def test_refs_branches_tags_and_pagination(hub, tmp_path):
    api = HfApi()
    api.create_repo("org/refs")
    main = api.upload_folder(repo_id="org/refs", folder_path=_folder(tmp_path)).oid
    api.create_branch("org/refs", branch="dev")
    api.create_tag("org/refs", tag="v1.0")
    dev = api.upload_file(path_or_fileobj=b"dev only", path_in_repo="dev.txt", repo_id="org/refs",
                          revision="dev").oid
    refs = api.list_repo_refs("org/refs")
    assert {b.name: b.target_commit for b in refs.branches} == {"main": main, "dev": dev}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1.0": main}
    assert open(hf_hub_download("org/refs", "dev.txt", revision="dev"), "rb").read() == b"dev only"
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/refs", "dev.txt")

    hub.page_size = 2
    paths = sorted(f.path for f in api.list_repo_tree("org/refs", recursive=True, revision="dev"))
    assert paths == [".gitattributes", "README.md", "config.json", "dev.txt", "sub", "sub/weights.safetensors"]
    assert len(api.list_repo_commits("org/refs", revision="dev")) == 3


def test_parent_commit_guard(hub):
    api = HfApi()
    api.create_repo("org/race")
    first = api.upload_file(path_or_fileobj=b"1", path_in_repo="a.txt", repo_id="org/race").oid
    api.upload_file(path_or_fileobj=b"2", path_in_repo="a.txt", repo_id="org/race")
    with pytest.raises(HfHubHTTPError) as exc_info:
        api.create_commit("org/race", [CommitOperationAdd("a.txt", b"3")], commit_message="stale",
                          parent_commit=first)
    assert _status(exc_info) == 412


def test_auth_failures(hub):
    with pytest.raises(HfHubHTTPError) as exc_info:
        HfApi(token="hf_not_a_valid_token").create_repo("org/x")
    assert _status(exc_info) == 401
    with pytest.raises(HfHubHTTPError) as exc_info:
        HfApi(token=READ_TOKEN).create_repo("org/x")
    assert _status(exc_info) == 403
    with pytest.raises(HfHubHTTPError) as exc_info:
        HfApi(token=OTHER_TOKEN).create_repo("org/x")
    assert _status(exc_info) == 403
    HfApi().create_repo("org/x")
    with pytest.raises(HfHubHTTPError):
        HfApi(token=READ_TOKEN).upload_file(path_or_fileobj=b"1", path_in_repo="a.txt", repo_id="org/x")


def test_unimplemented_routes_and_keys_answer_501(hub):
    api = HfApi()
    api.create_repo("org/five")
    with pytest.raises(HfHubHTTPError) as exc_info:
        api.update_repo_settings("org/five", gated="auto")
    assert _status(exc_info) == 501
    with pytest.raises(HfHubHTTPError) as exc_info:
        api.model_info("org/five", expand=["downloads"])
    assert _status(exc_info) == 501
    assert len(hub.unsupported) == 2 and "expand" in hub.unsupported[1]
    hub.unsupported.clear()  # expected here; anywhere else the `hub` fixture fails the test
