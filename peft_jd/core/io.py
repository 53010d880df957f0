"""Atomic writes: every file and folder peft-jd publishes goes through here (temp + rename, usual file modes)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import AdapterFormatError


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def publish_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """Gives a file (0666) or folder (0777) made by `mkstemp`/`mkdtemp` (0600/0700) the usual mode under the umask.

    Serving containers often run as another user than the one that wrote a collection; they must be able to read it.
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~_current_umask())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `path` through a temporary sibling and a rename: readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """JSON with sorted keys and indent 2 (reproducible files), written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def fix_tree_modes(root: str | os.PathLike) -> None:
    """Applies `publish_mode` to every file and folder below `root` (files written by libraries use mkstemp too)."""
    for directory, _folders, files in os.walk(root):
        publish_mode(directory, directory=True)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                publish_mode(path)


@contextlib.contextmanager
def atomic_directory(final_dir: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yields a temporary sibling directory that replaces `final_dir` only if the block finishes without error.

    A crash leaves at most a `.tmp-*` sibling, never a half-written `final_dir`. Files and folders get the usual
    modes (see `publish_mode`).
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    if final_dir.exists() and not overwrite:
        raise FileExistsError(f"{final_dir} already exists; pass overwrite=True or choose another directory.")
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{final_dir.name}-", dir=final_dir.parent))
    try:
        yield tmp_dir
        fix_tree_modes(tmp_dir)
        if final_dir.exists():
            trash = final_dir.parent / f".trash-{final_dir.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final_dir, trash)
            os.replace(tmp_dir, final_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp_dir, final_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def read_json_object(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object; `AdapterFormatError` naming `path` if missing, not JSON, or not an
    object."""
    if not os.path.isfile(path):
        raise AdapterFormatError(f"{what}: {path} does not exist (not a PEFT adapter, or an incomplete download).")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{what}: {path} is not valid JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{what}: {path} must hold a JSON object, not {type(data).__name__}.")
    return data
