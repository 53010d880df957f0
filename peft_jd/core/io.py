"""Atomic writes: every file and folder peft-jd publishes goes through here (temp + rename, usual file modes)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from filelock import FileLock, Timeout

from .errors import AdapterFormatError, CollectionLockedError, DestinationError
from .layout import MARKER_NAME, lock_path


logger = logging.getLogger(__name__)


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


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths with Linux `renameat2(RENAME_EXCHANGE)`; `False` where that is unavailable."""
    renameat2 = getattr(_LIBC, "renameat2", None) if _LIBC is not None else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(a))


try:
    _LIBC: Optional[ctypes.CDLL] = ctypes.CDLL(None, use_errno=True)
except OSError:  # not a glibc/musl platform: fall back to two renames plus recovery
    _LIBC = None


def _siblings(final_dir: Path, prefix: str) -> list[Path]:
    # The name is escaped: `--out 'run*'` must not match the temporary folders of another collection.
    pattern = f"{glob.escape(f'{prefix}-{final_dir.name}-')}*"
    return sorted(final_dir.parent.glob(pattern), key=lambda p: p.stat().st_mtime)


def recover_interrupted_swap(final_dir: str | os.PathLike) -> None:
    """Repairs what a crash during `atomic_directory` left: restores `final_dir` from its `.trash-*` copy if the crash
    fell between the two renames of a non-atomic swap, and removes stale `.tmp-*` / `.trash-*` siblings.

    Call it only while holding `writer_lock(final_dir)` (another writer's temporary folder would look stale).
    """
    final_dir = Path(final_dir)
    trash = _siblings(final_dir, ".trash")
    if not final_dir.exists() and trash:
        os.replace(trash.pop(), final_dir)
        logger.warning("restored %s from the copy an interrupted write left behind", final_dir)
    for leftover in trash + _siblings(final_dir, ".tmp"):
        logger.info("removing %s, left by an interrupted peft-jd write", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(
    final_dir: str | os.PathLike, overwrite: Optional[bool] = None, kind: Optional[str] = None
) -> Iterator[Path]:
    """Yields a temporary sibling directory that replaces `final_dir` only if the block finishes without error.

    The swap is one atomic `renameat2(RENAME_EXCHANGE)` where Linux offers it, so there is no moment where neither the
    old nor the new folder exists; elsewhere a crash between two renames is repaired by the next writer
    (`recover_interrupted_swap`). A crash leaves at most a `.tmp-*` sibling, never a half-written `final_dir`.
    With `kind`, writers of the same folder are serialised by `writer_lock`. Files and folders get the usual modes.

    Args:
        final_dir: The folder to (re)place.
        overwrite: With `kind` (default `False`): also replace a non-empty folder that is not a peft-jd `kind`
            artefact. Without `kind` (default `True`, for folders inside one peft-jd owns): whether an existing
            folder may be replaced at all.
        kind: The kind of artefact written (`layout.KIND_*`); a marker is written into the new folder and an
            existing folder is replaced only under the rules of `check_replaceable`.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    # A top-level artefact (`kind` given) is locked and repaired here; a folder inside one (a sigma adapter inside a
    # collection) is written under the lock its caller holds on the whole collection.
    with writer_lock(final_dir) if kind is not None else contextlib.nullcontext():
        if kind is not None:
            recover_interrupted_swap(final_dir)
            check_replaceable(final_dir, kind, bool(overwrite))
        elif final_dir.exists() and overwrite is False:
            raise FileExistsError(f"{final_dir} already exists; pass overwrite=True or choose another directory.")
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{final_dir.name}-", dir=final_dir.parent))
        try:
            yield tmp_dir
            if kind is not None:
                write_marker(tmp_dir, kind)
            fix_tree_modes(tmp_dir)
            _swap_into_place(tmp_dir, final_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise


def _swap_into_place(tmp_dir: Path, final_dir: Path) -> None:
    if not final_dir.exists():
        os.replace(tmp_dir, final_dir)
        return
    if _exchange(tmp_dir, final_dir):
        shutil.rmtree(tmp_dir, ignore_errors=True)  # now holds the old content
        return
    trash = final_dir.parent / f".trash-{final_dir.name}-{uuid.uuid4().hex[:8]}"
    os.replace(final_dir, trash)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(trash, ignore_errors=True)


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


# ------------------------------------------------------------------------------------------ markers, destinations
def write_marker(directory: str | os.PathLike, kind: str) -> None:
    """Marks `directory` as a peft-jd artefact of `kind` (so a later writer of the same kind may replace it)."""
    atomic_write_json(Path(directory) / MARKER_NAME, {"kind": kind, "written_by": "peft-jd"})


def read_marker(directory: str | os.PathLike) -> Optional[str]:
    """The kind recorded in `directory`'s marker, or `None` when it has none (or an unreadable one)."""
    path = Path(directory) / MARKER_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data.get("kind") if isinstance(data, dict) and data.get("written_by") == "peft-jd" else None


def check_replaceable(target: str | os.PathLike, kind: str, overwrite: bool = False) -> None:
    """Raises `DestinationError` unless `target` may be replaced by a new `kind` artefact.

    Allowed: a missing path, an empty folder, a folder whose marker says `kind`, or anything (but a file or a
    symlink) when `overwrite=True`. Never allowed: a regular file or a symlink in place of the folder.
    """
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise DestinationError(f"{target} exists and is not a folder; choose another destination.")
    if overwrite or not any(target.iterdir()):
        return
    found = read_marker(target)
    if found == kind:
        return
    what = f"a peft-jd {found}" if found else "not written by peft-jd"
    raise DestinationError(
        f"{target} is not empty and is {what}, not a peft-jd {kind}; nothing was written. Choose another folder, or "
        "pass --overwrite (overwrite=True) to replace it and everything in it."
    )


# -------------------------------------------------------------------------------------------------- writer locks
_LOCKS: dict[str, FileLock] = {}
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def writer_lock(target: str | os.PathLike, timeout: float = -1) -> Iterator[None]:
    """Holds the writers' lock of `target` (re-entrant within a thread); other processes wait, or fail after `timeout`.

    Args:
        target: The collection (or other output folder) being written.
        timeout: Seconds to wait for another writer; negative waits as long as it takes.
    """
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(str(path.resolve()), FileLock(str(path)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another peft-jd writer of %s (lock %s)", target, path)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise CollectionLockedError(
                f"{target} is being written by another peft-jd process (lock {path}); wait for it to finish. If no "
                "peft-jd process runs, the lock is stale: delete that file."
            ) from None
    try:
        yield
    finally:
        lock.release()
