"""The one way peft-jd downloads files from the Hub: huggingface_hub's cache, errors mapped to clear messages, and
sha256 checks of what was pinned.

huggingface_hub is imported when a download is needed, so that reading local collections works without it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Optional

from .errors import BasesMismatchError, JDLoraError
from .format import file_sha256


def _network_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError]
    # huggingface_hub 2.x talks HTTP through httpx2, 1.x through httpx; transport errors escape it mid-download.
    for module_name in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module_name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _one_line(exc: BaseException) -> str:
    """An exception's text on one line (httpx's messages span several), as error messages are printed."""
    return " ".join(str(exc).split())


def describe(repo_id: str, subfolder: Optional[str] = None, revision: Optional[str] = None) -> str:
    """`repo/subfolder@revision`, as messages name a Hub location."""
    return repo_id + (f"/{subfolder.strip('/')}" if subfolder else "") + (f"@{revision}" if revision else "")


def check_hub_path(value: Optional[str], what: str, error_cls: type[Exception] = JDLoraError) -> Optional[str]:
    """Returns a Hub subfolder, revision or file name if it cannot leave the repo's cache folder, else raises.

    huggingface_hub joins these to cache paths (`snapshots/<revision>/<subfolder>/<file>`, `refs/<revision>`), and
    they often come from files or the network (an index, an adapter config): `..` components, absolute paths,
    backslashes and control characters are refused before anything is requested or written.
    """
    if value is None or value == "":
        return value
    parts = value.strip("/").split("/") if isinstance(value, str) else []
    if (
        not isinstance(value, str)
        or value.startswith("/")
        or "\\" in value
        or any(ord(c) < 32 or c == "\x7f" for c in value)
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise error_cls(
            f"{what} {value!r} is not a relative Hub path ('/'-separated, no empty, '.' or '..' parts, no backslashes "
            "or control characters); the reference is corrupt or hostile, nothing was downloaded."
        )
    return value


def hub_download(
    repo_id: str,
    filenames: Sequence[str],
    *,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    what: str = "files",
    error_cls: type[Exception] = JDLoraError,
    expected_sha256: Optional[Mapping[str, str]] = None,
    **hub_kwargs,
) -> list[str]:
    """Downloads `filenames` from `repo_id[/subfolder]@revision` into the Hub cache and returns their local paths.

    Args:
        repo_id: Hub repo id.
        filenames: File names inside `subfolder`.
        subfolder: Folder inside the repo.
        revision: Branch, tag or commit sha; a missing revision is an error, never a fallback.
        what: What the files are, for messages (e.g. `"bases"`, `"adapter"`, `"LoRA"`).
        error_cls: Exception class raised for download failures.
        expected_sha256: File name → sha256 it must have (pinned content); a mismatch raises `BasesMismatchError`.
        hub_kwargs: Passed to `huggingface_hub.hf_hub_download` (`token`, `cache_dir`, `local_files_only`, …).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = describe(repo_id, subfolder, revision)
    for value, role in ((subfolder, "subfolder"), (revision, "revision"), *((f, "file name") for f in filenames)):
        check_hub_path(value, f"{what} {role}", error_cls)
    try:
        paths = [
            hf_hub_download(repo_id, name, subfolder=subfolder or None, revision=revision, **hub_kwargs)
            for name in filenames
        ]
    except RevisionNotFoundError as exc:
        raise error_cls(
            f"{what} repo {repo_id!r} has no revision {revision!r}. The commit may have been deleted or squashed; "
            "re-push it at that commit or re-compress. Branches and tags: `huggingface_hub.list_repo_refs`."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise error_cls(
            f"{what} repo {repo_id!r} not found (or private and not visible with your token). Check the reference, "
            "log in with `hf auth login` or set HF_TOKEN, or use a local copy."
        ) from exc
    except _network_errors() as exc:
        # Before EntryNotFoundError: huggingface_hub's LocalEntryNotFoundError (offline, not cached) subclasses it.
        raise error_cls(
            f"{what} {where} are not in the local cache and the Hub cannot be reached (offline mode or a network "
            f"error: {_one_line(exc)}). Download them once online (`peft-jd pull …`), or unset HF_HUB_OFFLINE."
        ) from exc
    except EntryNotFoundError as exc:
        raise error_cls(
            f"{where} has no {' + '.join(filenames)}; it is not a {what} folder (for a folder inside the repo, pass "
            "its subfolder)."
        ) from exc
    except HFValidationError as exc:
        raise error_cls(f"{repo_id!r} is neither a local folder nor a valid Hub repo id ({_one_line(exc)}).") from exc
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", "?")
        raise error_cls(
            f"downloading {what} {where} failed (HTTP {status}: {_one_line(exc)}). Nothing was loaded; retry when the "
            "Hub answers."
        ) from exc
    for name, path in zip(filenames, paths):
        expected = (expected_sha256 or {}).get(name)
        if expected and file_sha256(path) != expected:
            raise BasesMismatchError(
                f"{where}: {name} has sha256 {file_sha256(path)[:12]}…, but {expected[:12]}… was pinned. The file is "
                "corrupt or was replaced; delete it from the cache (`hf cache delete`) and download again."
            )
    return [os.fspath(p) for p in paths]
