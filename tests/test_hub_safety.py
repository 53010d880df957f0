"""hub_tools never writes outside its destination, never uploads what is not the collection, and explains bad input.

Against the local Hub: hostile index keys (`../../victim`, absolute paths), subfolders that leave the Hub cache,
symlinked or foreign files in a collection being pushed, weights files with the wrong tensors, JSON that is not an
object, an empty `pull --all`, `--local-dir` onto a user's folder; and a seeded property test feeding generated
hostile strings as index keys, adapter names, subfolders and bases references, checking with a snapshot of the file
system around the destination that nothing outside it (and the Hub cache) changes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi
from safetensors.torch import load_file, save_file
from utils import make_collection, tiny_llama

from hub_tools import CollectionError, PullError, list_collection, pull_adapter, pull_collection, push_collection
from peft_jd.cli import main as cli_main
from peft_jd.core import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    BASES_CONFIG_NAME,
    BASES_WEIGHTS_NAME,
    INDEX_NAME,
    KIND_COLLECTION,
    MARKER_NAME,
    REPORT_NAME,
    AdapterFormatError,
    DestinationError,
    JDLoraError,
    file_sha256,
    lock_path,
    write_marker,
    writer_lock,
)


pytest_plugins = ["hub_server.fixtures"]

SECRET = b"hf_" + b"s3cr3t-token-that-must-never-leave" * 4


@pytest.fixture(scope="module")
def collection_source(tmp_path_factory):
    """The module's collection; tests that modify it take `collection`, a private copy (conftest.py)."""
    root = tmp_path_factory.mktemp("safety-collection")
    make_collection(root, tiny_llama(), n_adapters=2, r=4, clusters=2)
    return root


@pytest.fixture
def pushed(hub, collection_source):
    """`org/collection` (single-repo layout) on the local Hub; returns its index."""
    push_collection(collection_source, repo="org/collection", progress=False)
    return json.loads(hub.file_bytes("org/collection", INDEX_NAME))


def _commit(repo_id: str, files: dict[str, bytes]) -> None:
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.create_commit(repo_id, [CommitOperationAdd(p, data) for p, data in files.items()], commit_message="edit")


def _snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, object]:
    """Every path below `root` (not following links, not below `skip`) with its content, link target or `dir`."""
    found: dict[str, object] = {}
    for directory, folders, files in os.walk(root):
        folders[:] = [f for f in folders if Path(directory, f) not in skip]
        for name in folders + files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                found[path] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                found[path] = "dir"
            else:
                with open(path, "rb") as f:
                    found[path] = f.read()
    return found


def _changed(before: dict, after: dict) -> set[str]:
    return {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}


def _outside(changed: set[str], allowed: list[Path]) -> list[str]:
    return sorted(p for p in changed if not any(p == str(a) or p.startswith(str(a) + os.sep) for a in allowed))


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    return victim


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    status = cli_main(argv)
    return status, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- pull: confinement
@pytest.mark.parametrize("hostile", ["../../victim", "ABSOLUTE"])
def test_index_key_leaving_local_dir_is_refused(hub, pushed, tmp_path, hostile):
    victim = _victim(tmp_path)
    key = str(victim) if hostile == "ABSOLUTE" else hostile
    index = {**pushed, "adapters": {**pushed["adapters"], key: pushed["adapters"]["task-0"]}}
    _commit("org/collection", {INDEX_NAME: json.dumps(index).encode()})
    local = tmp_path / "local"
    before = _snapshot(tmp_path)
    with pytest.raises(PullError, match="adapter name"):
        pull_collection("org/collection", local_dir=local)
    assert (victim / "thesis.tex").read_text() == "years of work"
    assert not local.exists()
    assert _outside(_changed(before, _snapshot(tmp_path)), [tmp_path / "hf_home"]) == []
    with pytest.raises(PullError, match="adapter name"):
        list_collection("org/collection")


def test_subfolder_escaping_the_hub_cache_is_refused(hub, pushed, collection_source, tmp_path):
    # A local adapter folder that `../` components from the snapshot folder reach (old code returned it as downloaded).
    outside = tmp_path / "outside" / "adapter"
    shutil.copytree(collection_source / "adapters" / "task-0", outside)
    config = json.loads((outside / ADAPTER_CONFIG_NAME).read_text())
    config.update(bases="org/collection", bases_subfolder="bases", bases_revision=pushed["bases"]["revision"])
    (outside / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    escape = "../" * 40 + str(outside).lstrip("/")
    index = {**pushed, "adapters": {"task-0": {**pushed["adapters"]["task-0"], "subfolder": escape}}}
    _commit("org/collection", {INDEX_NAME: json.dumps(index).encode()})
    with pytest.raises(PullError, match="subfolder"):
        pull_collection("org/collection", local_dir=tmp_path / "local")
    with pytest.raises(PullError, match="subfolder"):
        pull_adapter("org/collection", subfolder=escape)
    assert not (tmp_path / "local").exists()


@pytest.mark.parametrize("field, value", [("bases_subfolder", "../../../../../etc"), ("bases", "/etc/passwd-dir"),
                                          ("bases_revision", "../../../../victim")])
def test_bases_reference_from_config_cannot_leave_the_cache(hub, pushed, collection_source, tmp_path, field, value):
    config = json.loads((collection_source / "adapters" / "task-0" / ADAPTER_CONFIG_NAME).read_text())
    config.update({"bases": "org/collection", "bases_subfolder": "bases", field: value})
    weights = (collection_source / "adapters" / "task-0" / ADAPTER_WEIGHTS_NAME).read_bytes()
    _commit("org/hostile", {ADAPTER_CONFIG_NAME: json.dumps(config).encode(), ADAPTER_WEIGHTS_NAME: weights})
    before = _snapshot(tmp_path)
    with pytest.raises(JDLoraError, match="bases"):
        pull_adapter("org/hostile", local_dir=tmp_path / "local")
    assert _outside(_changed(before, _snapshot(tmp_path)), [tmp_path / "hf_home" / "hub"]) == []


# ----------------------------------------------------------------------------------------------- pull: local_dir
def test_local_dir_onto_a_user_folder_is_refused_unless_overwrite(hub, pushed, tmp_path, capsys):
    victim = _victim(tmp_path)
    with pytest.raises(DestinationError, match="not written by peft-jd"):
        pull_adapter("org/collection", subfolder="adapters/task-0", local_dir=victim)
    assert sorted(p.name for p in victim.iterdir()) == ["thesis.tex"]
    status, err = _cli(["pull", "org/collection", "--all", "--local-dir", str(victim)], capsys)
    assert status == 1 and err.startswith("error: ") and err.count("\n") == 1 and "--overwrite" in err
    assert sorted(p.name for p in victim.iterdir()) == ["thesis.tex"]

    assert cli_main(["pull", "org/collection", "--all", "--local-dir", str(victim), "--overwrite"]) == 0
    assert sorted(p.name for p in victim.iterdir()) == [MARKER_NAME, "adapters", "bases"]
    assert sorted(p.name for p in (victim / "adapters").iterdir()) == ["task-0", "task-1"]


def test_local_dir_that_a_pull_wrote_is_extended_and_files_links_outputs_refused(
    hub, pushed, collection_source, tmp_path
):
    local = tmp_path / "local"
    pull_adapter("org/collection", subfolder="adapters/task-0", local_dir=local)
    pulled = pull_adapter("org/collection", subfolder="adapters/task-1", local_dir=local)
    assert sorted(p.name for p in (local / "adapters").iterdir()) == ["task-0", "task-1"]
    assert pulled.adapter_dir == local / "adapters" / "task-1"
    assert file_sha256(local / "bases" / BASES_WEIGHTS_NAME) == pushed["bases"]["fingerprint"]
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-link").symlink_to(local)
    for target in ("a-file", "a-link"):
        with pytest.raises(DestinationError, match="not a folder"):
            pull_adapter("org/collection", subfolder="adapters/task-0", local_dir=tmp_path / target)
    assert (tmp_path / "a-file").read_text() == "x"
    # A compression output (marker + report) is not extended: its report would not list the pulled adapter.
    compressed = tmp_path / "compressed"
    shutil.copytree(collection_source, compressed)
    write_marker(compressed, KIND_COLLECTION)
    (compressed / REPORT_NAME).write_text("{}")
    before = _snapshot(compressed)
    with pytest.raises(DestinationError, match="output of `peft-jd compress`"):
        pull_adapter("org/collection", subfolder="adapters/task-0", adapter_name="task-7", local_dir=compressed)
    assert _snapshot(compressed) == before


# --------------------------------------------------------------------------------------------- pull: bad content
@pytest.mark.parametrize("content, message", [(b"[]", "must be a JSON object"), (b"\x89PNG\r\n\x00\xff", "not a JSON"),
                                              (b'{"adapters": ["task-0"]}', "`adapters` must be an object"),
                                              (b'{"adapters": {"task-0": 3}}', "must be an object")])
def test_malformed_index_is_a_clear_error(hub, pushed, tmp_path, capsys, content, message):
    _commit("org/collection", {INDEX_NAME: content})
    with pytest.raises(PullError, match=message):
        pull_collection("org/collection", local_dir=tmp_path / "local")
    status, err = _cli(["ls", "org/collection"], capsys)
    assert status == 1 and err.startswith("error: ") and err.count("\n") == 1 and INDEX_NAME in err
    assert not (tmp_path / "local").exists()


@pytest.mark.parametrize("content", [b"[1, 2]", b"\xff\xfe\x00binary", b'{"peft_type": "JDLORA", "r": "four"}'])
def test_malformed_remote_adapter_config_is_a_clear_error(hub, pushed, tmp_path, capsys, content):
    _commit("org/collection", {f"adapters/task-0/{ADAPTER_CONFIG_NAME}": content})
    with pytest.raises(AdapterFormatError, match=ADAPTER_CONFIG_NAME):
        pull_adapter("org/collection", subfolder="adapters/task-0", local_dir=tmp_path / "local")
    status, err = _cli(["pull", "org/collection", "--adapters", "task-0"], capsys)
    assert status == 1 and err.count("\n") == 1 and "task-0" in err
    assert not (tmp_path / "local").exists()


def test_pull_all_of_an_empty_index_is_a_clear_error(hub, pushed, capsys):
    _commit("org/collection", {INDEX_NAME: json.dumps({**pushed, "adapters": {}}).encode()})
    with pytest.raises(PullError, match="lists no adapters"):
        pull_collection("org/collection")
    status, err = _cli(["pull", "org/collection", "--all"], capsys)
    assert status == 1 and err.startswith("error: ") and err.count("\n") == 1 and "no adapters" in err


def test_pull_validates_sigma_against_its_bases(hub, pushed, collection_source, tmp_path):
    weights = load_file(collection_source / "adapters" / "task-0" / ADAPTER_WEIGHTS_NAME)
    key = sorted(weights)[0]
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, tmp_path / "nan.safetensors")
    _commit("org/collection", {f"adapters/task-0/{ADAPTER_WEIGHTS_NAME}": (tmp_path / "nan.safetensors").read_bytes()})
    with pytest.raises(AdapterFormatError, match="NaN"):
        pull_collection("org/collection", local_dir=tmp_path / "local")
    assert not (tmp_path / "local").exists()


# --------------------------------------------------------------------------------------------- push: what leaves
@pytest.mark.parametrize("target", ["token", "valid-weights-outside"])
def test_push_refuses_symlinked_weights(hub, collection, tmp_path, target):
    outside = tmp_path / target
    if target == "token":
        outside.write_bytes(SECRET)
    else:
        shutil.copyfile(collection / "adapters" / "task-1" / ADAPTER_WEIGHTS_NAME, outside)
    weights = collection / "adapters" / "task-1" / ADAPTER_WEIGHTS_NAME
    weights.unlink()
    weights.symlink_to(outside)
    with pytest.raises(CollectionError, match="symbolic link"):
        push_collection(collection, repo="org/collection", progress=False)
    assert not hub.store.repos and hub.uploaded_bytes() == 0


@pytest.mark.parametrize("linked", ["adapter folder", "bases folder", "report"])
def test_push_refuses_files_outside_the_collection(hub, collection, collection_source, tmp_path, linked):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if linked == "adapter folder":
        shutil.copytree(collection_source / "adapters" / "task-0", elsewhere / "task-9")
        (collection / "adapters" / "task-9").symlink_to(elsewhere / "task-9")
    elif linked == "bases folder":
        shutil.move(collection / "bases", elsewhere / "bases")
        (collection / "bases").symlink_to(elsewhere / "bases")
    else:
        (elsewhere / "report.json").write_text(json.dumps({"token": SECRET.decode()}))
        (collection / "report.json").symlink_to(elsewhere / "report.json")
    with pytest.raises(CollectionError, match="symbolic link"):
        push_collection(collection, repo="org/collection", progress=False)
    assert not hub.store.repos


def _rewrite_bases_without(collection: Path, dropped: str) -> None:
    """Drops one tensor from the bases file and re-records its sha256 (so only the content check can notice)."""
    path = collection / "bases" / BASES_WEIGHTS_NAME
    tensors = load_file(path)
    del tensors[dropped]
    save_file(tensors, path)
    config = json.loads((collection / "bases" / BASES_CONFIG_NAME).read_text())
    config["fingerprint"] = file_sha256(path)
    (collection / "bases" / BASES_CONFIG_NAME).write_text(json.dumps(config))


@pytest.mark.parametrize("case, message", [
    ("token as weights", "not a readable safetensors"),
    ("stray tensor", "unexpected tensor"),
    ("sigma of wrong shape", "shape"),
    ("bases without a V", "does not hold the tensors"),
])
def test_push_checks_weights_content(hub, collection, case, message):
    weights = collection / "adapters" / "task-1" / ADAPTER_WEIGHTS_NAME
    if case == "token as weights":
        weights.write_bytes(SECRET)
    elif case in ("stray tensor", "sigma of wrong shape"):
        tensors = load_file(weights)
        key = sorted(tensors)[0]
        if case == "stray tensor":
            tensors[key.replace("jd_sigma", "lora_A.weight")] = torch.zeros(2, 2)
        else:
            tensors[key] = torch.zeros(3, 3)
        save_file(tensors, weights)
    else:
        module = json.loads((collection / "bases" / BASES_CONFIG_NAME).read_text())["modules"]
        _rewrite_bases_without(collection, f"{sorted(module)[0]}.V")
    with pytest.raises(CollectionError, match=message):
        push_collection(collection, repo="org/collection", progress=False)
    assert not hub.store.repos


@pytest.mark.parametrize("where, content", [("adapter", b"[1]"), ("adapter", b"\x00\xffbin"), ("report", b"[]"),
                                            ("bases", b'"text"')])
def test_push_refuses_json_that_is_not_an_object(hub, collection, capsys, where, content):
    path = {"adapter": collection / "adapters" / "task-0" / ADAPTER_CONFIG_NAME,
            "report": collection / "report.json", "bases": collection / "bases" / BASES_CONFIG_NAME}[where]
    path.write_bytes(content)
    with pytest.raises(CollectionError, match=path.name):
        push_collection(collection, repo="org/collection", progress=False)
    status, err = _cli(["push", str(collection), "--repo", "org/collection", "--no-progress"], capsys)
    assert status == 1 and err.startswith("error: ") and err.count("\n") == 1
    assert not hub.store.repos


def test_push_uploads_no_marker_lock_temp_or_stray_file(hub, collection):
    (collection / MARKER_NAME).write_text(json.dumps({"kind": "collection", "written_by": "peft-jd"}))
    (collection / "notes.txt").write_bytes(SECRET)
    lock_path(collection).write_text("")
    for leftover in (".tmp-task-0-1234", ".trash-task-1-abcd"):
        shutil.copytree(collection / "adapters" / "task-0", collection / "adapters" / leftover)
    (collection / "adapters" / "stray.bin").write_bytes(SECRET)
    (collection / "bases" / ".tmp-jd_bases.safetensors-x").write_bytes(SECRET)
    push_collection(collection, repo="org/collection", progress=False)
    files = set(hub.repo("org/collection").resolve("main").files)
    assert files == {".gitattributes", INDEX_NAME, "README.md", "bases/" + BASES_CONFIG_NAME,
                     "bases/" + BASES_WEIGHTS_NAME} | {f"adapters/task-{i}/{n}" for i in range(2)
                                                        for n in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)}
    assert not any(SECRET in hub.file_bytes("org/collection", f) for f in files)


def test_push_waits_for_the_writers_lock(hub, collection):
    result: list = []

    def push():
        result.append(push_collection(collection, repo="org/collection", progress=False))

    with writer_lock(collection):
        worker = threading.Thread(target=push)
        worker.start()
        worker.join(timeout=1.5)
        assert worker.is_alive() and not hub.store.repos  # blocked on the lock, nothing uploaded
    worker.join(timeout=60)
    assert result and result[0].uploaded == ["task-0", "task-1"]


# ------------------------------------------------------------------------------------------ property: confinement
_FRAGMENTS = ["..", ".", "", "/", "\\", "\x00", "~", "$HOME", "é", "名前", "\u202e", "\n", " ", "a" * 250, ".hidden",
              "-x", "task-0", "adapters", "victim", "/etc", "C:\\x", "%2e%2e", ".git", "..\\..", "//", "\t", "*", "?"]
_SEPARATORS = ["/", "\\", "", "/../", "/./"]


def hostile_strings(seed: int, count: int) -> list[str]:
    """Seeded hostile strings: the fragments alone, then random joins of 1-4 fragments with path separators."""
    rng = random.Random(seed)
    out = list(_FRAGMENTS) + ["../victim", "../../victim", "adapters/../../victim", "/tmp/victim", "a/b/../../.."]
    while len(out) < count:
        parts = [rng.choice(_FRAGMENTS) for _ in range(rng.randint(1, 4))]
        out.append("".join(p + rng.choice(_SEPARATORS) for p in parts[:-1]) + parts[-1])
    return out[:count]


def _attack(kind: str, value: str, pushed: dict, source: Path, dest: Path) -> None:
    """One way a hostile `value` reaches a pull: index key, index subfolder, argument, config reference."""
    entry = pushed["adapters"]["task-0"]
    if kind == "index key":
        _commit("org/collection", {INDEX_NAME: json.dumps({**pushed, "adapters": {value: entry}}).encode()})
        pull_collection("org/collection", local_dir=dest)
    elif kind == "index subfolder":
        index = {**pushed, "adapters": {"task-0": {**entry, "subfolder": value}}}
        _commit("org/collection", {INDEX_NAME: json.dumps(index).encode()})
        pull_collection("org/collection", local_dir=dest)
    elif kind == "subfolder argument":
        pull_adapter("org/collection", subfolder=value, local_dir=dest)
    elif kind == "adapter name argument":
        pull_adapter("org/collection", subfolder="adapters/task-0", adapter_name=value, local_dir=dest)
    else:
        config = json.loads((source / "adapters" / "task-0" / ADAPTER_CONFIG_NAME).read_text())
        config.update({"bases": "org/collection", "bases_subfolder": "bases", kind: value})
        weights = (source / "adapters" / "task-0" / ADAPTER_WEIGHTS_NAME).read_bytes()
        _commit("org/hostile", {ADAPTER_CONFIG_NAME: json.dumps(config).encode(), ADAPTER_WEIGHTS_NAME: weights})
        pull_adapter("org/hostile", local_dir=dest)


ATTACKS = ("index key", "index subfolder", "subfolder argument", "adapter name argument", "bases_subfolder",
           "bases_revision")


def test_hostile_names_and_subfolders_never_write_outside_the_destination(hub, pushed, collection_source, tmp_path):
    victim = _victim(tmp_path)
    dest = tmp_path / "a" / "b" / "dest"
    allowed = [dest, lock_path(dest)]
    parents = {str(p) for p in dest.parents if tmp_path in p.parents}
    outcomes = {"refused": 0, "pulled": 0}
    cache = tmp_path / "hf_home" / "hub"  # huggingface_hub's own (allowed) writes
    for value in hostile_strings(seed=20251202, count=40):
        for kind in ATTACKS:
            before = _snapshot(tmp_path, skip=(cache,))
            try:
                _attack(kind, value, pushed, collection_source, dest)
                outcomes["pulled"] += 1
            except JDLoraError:
                outcomes["refused"] += 1
            after = _snapshot(tmp_path, skip=(cache,))
            # Creating the destination's missing parent folders is part of writing it.
            changed = {p for p in _changed(before, after) if not (p in parents and after.get(p) == "dir")}
            assert _outside(changed, allowed) == [], f"{kind} {value!r} changed files outside {dest}"
            assert (victim / "thesis.tex").read_text() == "years of work"
    # Both branches ran: plain names pull, hostile ones are refused.
    assert outcomes["refused"] > 100 and outcomes["pulled"] >= 3, outcomes
