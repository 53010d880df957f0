"""Core write guarantees: which folders may be replaced, the writers' lock, the crash-safe swap and its repair, file
modes, and the one rule for names that become paths."""

from __future__ import annotations

import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import peft_jd.core.io as core_io
from peft_jd.core import (
    KIND_COLLECTION,
    AdapterNameError,
    CollectionLockedError,
    DestinationError,
    atomic_directory,
    check_path_component,
    confined_path,
    read_marker,
    writer_lock,
)


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_user_folder_is_never_replaced_without_overwrite(tmp_path):
    user = tmp_path / "work"
    write_tree(user, {"report.json": "{}", "notes.txt": "mine"})
    with pytest.raises(DestinationError, match="not written by peft-jd"):
        with atomic_directory(user, kind=KIND_COLLECTION) as tmp:
            (tmp / "new").write_text("x")
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt", "report.json"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_own_artefact_is_replaced_and_overwrite_replaces_anything(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out, kind=KIND_COLLECTION) as tmp:
        (tmp / "a").write_text("1")
    assert read_marker(out) == KIND_COLLECTION
    with atomic_directory(out, kind=KIND_COLLECTION) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [".peft-jd.json", "b"]
    with pytest.raises(DestinationError, match="peft-jd collection, not a peft-jd lora-export"):
        with atomic_directory(out, kind="lora-export"):
            pass
    with atomic_directory(out, kind="lora-export", overwrite=True) as tmp:
        (tmp / "c").write_text("3")
    assert read_marker(out) == "lora-export"


def test_file_or_symlink_in_place_of_the_folder_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path)
    for target in ("file", "link"):
        with pytest.raises(DestinationError, match="not a folder"):
            with atomic_directory(tmp_path / target, kind=KIND_COLLECTION, overwrite=True):
                pass
    assert (tmp_path / "file").read_text() == "x" and (tmp_path / "link").is_symlink()


def test_failed_write_keeps_the_old_folder(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out, kind=KIND_COLLECTION) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out, kind=KIND_COLLECTION) as tmp:
            (tmp / "a").write_text("new")
            raise RuntimeError("crash")
    assert (out / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".tmp", ".trash"))] == []


@pytest.mark.parametrize("exchange", [True, False])
def test_swap_with_and_without_rename_exchange(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(core_io, "_LIBC", None)
    out = tmp_path / "out"
    for text in ("1", "2"):
        with atomic_directory(out, kind=KIND_COLLECTION) as tmp:
            (tmp / "a").write_text(text)
    assert (out / "a").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.peft-jd.lock", "out"]


def test_crash_between_two_renames_is_repaired_and_leftovers_removed(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out, kind=KIND_COLLECTION) as tmp:
        (tmp / "a").write_text("old")
    # What a kill between `out → .trash-out-*` and `.tmp-out-* → out` leaves (no RENAME_EXCHANGE available):
    os.replace(out, tmp_path / ".trash-out-deadbeef")
    write_tree(tmp_path / ".tmp-out-abc123", {"a": "half-written"})
    with atomic_directory(out, kind=KIND_COLLECTION) as tmp:
        assert (out / "a").read_text() == "old"  # restored before anything else happens
        (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.peft-jd.lock", "out"]


def test_published_files_and_folders_get_the_usual_modes(tmp_path):
    import torch
    from safetensors.torch import save_file

    old_umask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out", kind=KIND_COLLECTION) as tmp:
            save_file({"w": torch.zeros(2)}, tmp / "w.safetensors")
            (tmp / "sub").mkdir(mode=0o700)
            core_io.atomic_write_json(tmp / "sub" / "c.json", {"a": 1})
    finally:
        os.umask(old_umask)
    out = tmp_path / "out"
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes == {".": 0o755, ".peft-jd.json": 0o644, "w.safetensors": 0o644, "sub": 0o755, "sub/c.json": 0o644}


def test_second_writer_waits_or_fails_clearly(tmp_path):
    out = tmp_path / "coll"
    code = (
        "import sys; from peft_jd.core import writer_lock, CollectionLockedError\n"
        "try:\n"
        f"    with writer_lock({str(out)!r}, timeout=0.3): print('acquired')\n"
        "except CollectionLockedError as exc: print('locked:', exc)\n"
    )
    with writer_lock(out):
        with writer_lock(out):  # re-entrant in the holder
            held = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert held.stdout.startswith("locked:") and "being written by another peft-jd process" in held.stdout
    assert free.stdout.strip() == "acquired"
    assert issubclass(CollectionLockedError, ValueError)


def hostile_names(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    pieces = ["..", ".", "/", "\\", "\x00", "~", "a", "ü", "名", " ", "-", "_", ":", "$HOME", "%2e%2e", "\n", "*"]
    names = ["", ".", "..", "/etc", "../x", "a/../../b", "C:\\x", "x" * 300, ".hidden", "a/b"]
    for _ in range(count):
        names.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))))
    return names


def test_hostile_names_never_resolve_outside_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "escape").symlink_to(tmp_path)
    outside = 0
    for name in hostile_names(seed=0, count=500) + ["escape", "escape/x"]:
        try:
            path = confined_path(root, name)
        except AdapterNameError:
            outside += 1
            continue
        resolved = path.resolve()
        assert resolved == root.resolve() or root.resolve() in resolved.parents, name
        try:
            component = check_path_component(name)
        except AdapterNameError:
            continue
        assert "/" not in component and "\\" not in component and component not in (".", "..")
    assert outside > 100  # the generator does produce escapes, and they are refused
    with pytest.raises(AdapterNameError, match="outside"):
        confined_path(root, "escape")


@pytest.mark.parametrize("name", ["run*", "out[12]", "a?"])
def test_repair_never_touches_another_collections_leftovers(tmp_path, name):
    # A writer of `run*` cleaning its own leftovers must not match the temporary folders of `run-other`, nor
    # "restore" another collection's trash as its own folder.
    others = [tmp_path / f".tmp-{name.strip('*?[]')}x-abc", tmp_path / ".trash-runother-deadbeef",
              tmp_path / ".trash-out1-deadbeef", tmp_path / ".tmp-ab-123"]
    for other in others:
        write_tree(other, {"keep": "theirs"})
    with atomic_directory(tmp_path / name, kind=KIND_COLLECTION) as tmp:
        (tmp / "a").write_text("new")
    assert all((other / "keep").read_text() == "theirs" for other in others)
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == [".peft-jd.json", "a"]
