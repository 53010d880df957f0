"""`pull_adapter` / `pull_collection`: download sigma adapters and the exact bases commit they pin.

Everything goes through huggingface_hub's cache (`HF_HOME`, offline mode, `local_files_only`): bases pinned to a
commit sha are downloaded once and shared by every adapter that pins them. The bases file is checked against the
sha256 the adapter records before anything is returned. With `local_dir`, a self-contained copy is materialised as
`local_dir/bases/` + `local_dir/adapters/<name>/` (hard links into the cache where possible), loadable offline by path.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import httpx2
from huggingface_hub import HfApi
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)

from peft_jd.core import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    BASES_CONFIG_NAME,
    BASES_WEIGHTS_NAME,
    BasesConfig,
    BasesMismatchError,
    BasesNotFoundError,
    atomic_directory,
    is_relative_reference,
    resolve_relative_bases,
)

from .errors import PullError
from .local import config_json_bytes, verified_sha256


logger = logging.getLogger(__name__)

# huggingface_hub (2.x) speaks HTTP through httpx2; transport errors escape it when a download dies mid-way.
_NETWORK_ERRORS = (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError, httpx2.TransportError)


@dataclass
class PulledAdapter:
    """A downloaded sigma adapter and its verified bases.

    Args:
        name: Adapter name (repo name, or folder name inside a collection repo).
        repo_id: Hub repo of the adapter; `subfolder` its folder in it.
        revision: Commit sha the adapter files were downloaded from.
        adapter_dir: Local folder with `adapter_config.json` and `adapter_model.safetensors`.
        bases_repo: Hub repo of the bases; `bases_subfolder` their folder; `bases_revision` the pinned commit.
        bases_dir: Local folder with the verified bases files.
        fingerprint: sha256 of the bases weights (checked against the adapter's record).
    """

    name: str
    repo_id: str
    subfolder: Optional[str]
    revision: str
    adapter_dir: Path
    bases_repo: str
    bases_subfolder: Optional[str]
    bases_revision: str
    bases_dir: Path
    fingerprint: str

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """Arguments for `PeftModel.from_pretrained(base_model, **kwargs)` loading this exact adapter from the Hub."""
        kwargs = {"model_id": self.repo_id, "revision": self.revision}
        if self.subfolder:
            kwargs["subfolder"] = self.subfolder
        return kwargs


def _describe(repo_id: str, subfolder: Optional[str], revision: Optional[str]) -> str:
    return repo_id + (f"/{subfolder}" if subfolder else "") + (f"@{revision}" if revision else "")


def _download_adapter(api: HfApi, repo_id: str, subfolder: Optional[str], revision: Optional[str],
                      hub_kwargs: dict) -> tuple[Path, str]:
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    where = _describe(repo_id, subfolder, revision)
    try:
        snapshot = api.snapshot_download(
            repo_id, revision=revision, **hub_kwargs,
            allow_patterns=[prefix + ADAPTER_CONFIG_NAME, prefix + ADAPTER_WEIGHTS_NAME, prefix + "README.md"],
        )
    except RevisionNotFoundError as exc:
        raise PullError(f"{repo_id} has no revision {revision!r}; list its branches and tags with "
                        "`huggingface_hub.list_repo_refs`.") from exc
    except RepositoryNotFoundError as exc:
        raise PullError(f"repo {repo_id!r} not found, or private and not visible with your token (log in with "
                        "`hf auth login` or set HF_TOKEN).") from exc
    except _NETWORK_ERRORS as exc:
        raise PullError(f"cannot download {where}: the Hub is unreachable (or offline mode is on) and the adapter is "
                        f"not in the local cache ({exc}).") from exc
    except HfHubHTTPError as exc:
        raise _http_failure(where, exc) from exc
    directory = Path(snapshot) / prefix
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        if not (directory / name).is_file():
            hint = " For a collection repo, pass the adapter folder (e.g. subfolder='adapters/<name>') or pull " \
                   "the whole collection." if not subfolder else ""
            raise PullError(f"{where} has no {name}; it is not a JD-LoRA sigma adapter.{hint}")
    return directory, Path(snapshot).name


def _bases_reference(config: dict, repo_id: str, subfolder: Optional[str], where: str
                     ) -> tuple[str, Optional[str], Optional[str]]:
    if config.get("peft_type") != "JDLORA":
        raise PullError(f"{where} is a {config.get('peft_type')!r} adapter, not a JD-LoRA sigma adapter.")
    bases, bases_subfolder = config.get("bases"), config.get("bases_subfolder")
    if not bases:
        raise PullError(f"{where}: adapter config has no `bases`; it cannot be used without its shared bases.")
    if is_relative_reference(bases):
        # Same rule as `JDLoraConfig.from_pretrained`: a relative reference names a folder of the adapter's repo.
        try:
            bases, bases_subfolder = resolve_relative_bases(bases, bases_subfolder, repo_id, subfolder)
        except ValueError as exc:
            raise PullError(f"{where}: {exc}") from exc
    elif os.path.isabs(bases):
        raise PullError(f"{where}: adapter points to the local folder {bases!r}; it was uploaded without "
                        "`peft-jd push`, which rewrites the bases reference to the pushed bases.")
    return bases, bases_subfolder, config.get("bases_revision")


def _download_bases(api: HfApi, repo_id: str, subfolder: Optional[str], revision: str, adapter: str,
                    hub_kwargs: dict) -> Path:
    where = _describe(repo_id, subfolder, revision)
    try:
        paths = [api.hf_hub_download(repo_id, name, subfolder=subfolder, revision=revision, **hub_kwargs)
                 for name in (BASES_CONFIG_NAME, BASES_WEIGHTS_NAME)]
    except RevisionNotFoundError as exc:
        raise BasesNotFoundError(
            f"adapter {adapter!r} pins bases {where}, but that commit no longer exists in {repo_id} (history "
            "rewritten or squashed). The adapter cannot be loaded safely against other bases: restore the commit "
            "or re-push the collection."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise BasesNotFoundError(f"adapter {adapter!r}: bases repo {repo_id!r} not found or not accessible with "
                                 "your token.") from exc
    except _NETWORK_ERRORS as exc:
        raise PullError(f"cannot download bases {where} for adapter {adapter!r}: the Hub is unreachable (or offline "
                        f"mode is on) and they are not in the local cache ({exc}).") from exc
    except EntryNotFoundError as exc:
        raise BasesNotFoundError(f"adapter {adapter!r}: {where} has no {BASES_CONFIG_NAME} / {BASES_WEIGHTS_NAME}; "
                                 "it is not a JD bases folder.") from exc
    except HfHubHTTPError as exc:
        raise _http_failure(f"bases {where}", exc) from exc
    return Path(paths[0]).parent


def _current_commit(api: HfApi, bases_repo: str, same_repo_commit: Optional[str], adapter: str,
                    local_files_only: bool) -> str:
    """Bases commit of an adapter that pins none (not pushed with `peft-jd push`); its sha256 is still checked."""
    if same_repo_commit:
        return same_repo_commit
    try:
        return api.resolve_revision(bases_repo, local_files_only=local_files_only).resolved
    except RepositoryNotFoundError as exc:
        raise BasesNotFoundError(f"adapter {adapter!r}: bases repo {bases_repo!r} not found or not accessible."
                                 ) from exc
    except (RevisionResolutionError, HfHubHTTPError) as exc:
        raise PullError(f"adapter {adapter!r} does not pin its bases and the current commit of {bases_repo!r} cannot "
                        f"be resolved ({exc}).") from exc


def _verify_bases(bases_dir: Path, config: dict, adapter: str, where: str) -> str:
    """Checks the downloaded bases against the adapter's records; returns their sha256."""
    bases_config = BasesConfig.from_file(bases_dir / BASES_CONFIG_NAME)
    actual = verified_sha256(bases_dir / BASES_WEIGHTS_NAME)
    for label, expected in (("the adapter", config.get("bases_fingerprint")), ("the bases config",
                                                                              bases_config.fingerprint)):
        if expected and expected != actual:
            raise BasesMismatchError(
                f"bases {where} downloaded for adapter {adapter!r} have sha256 {actual[:12]}…, but {label} records "
                f"{expected[:12]}…. The file is corrupt or the repo was rewritten; delete it from the cache "
                f"({bases_dir}) and pull again."
            )
    if bases_config.r != config.get("r") or bases_config.sigma_type != config.get("sigma_type"):
        raise BasesMismatchError(f"adapter {adapter!r} (r={config.get('r')}, {config.get('sigma_type')}) does not "
                                 f"match its bases {where} (r={bases_config.r}, {bases_config.sigma_type}).")
    return actual


def _place(source: Path, target: Path) -> None:
    """Hard-links a cache file into `target` (no second copy of multi-GB bases), copying across file systems."""
    try:
        os.link(os.path.realpath(source), target)
    except OSError:
        shutil.copyfile(source, target)


def _materialise(pulled: PulledAdapter, config: dict, local_dir: Path) -> PulledAdapter:
    bases_dir = local_dir / "bases"
    if (bases_dir / BASES_WEIGHTS_NAME).is_file():
        if verified_sha256(bases_dir / BASES_WEIGHTS_NAME) != pulled.fingerprint:
            raise BasesMismatchError(
                f"{bases_dir} holds other bases than the ones adapter {pulled.name!r} pins "
                f"({_describe(pulled.bases_repo, pulled.bases_subfolder, pulled.bases_revision)}); a local folder "
                "serves one bases revision. Pull into another local_dir."
            )
    else:
        with atomic_directory(bases_dir) as tmp:
            for name in (BASES_CONFIG_NAME, BASES_WEIGHTS_NAME):
                _place(pulled.bases_dir / name, tmp / name)
    adapter_dir = local_dir / "adapters" / pulled.name
    with atomic_directory(adapter_dir) as tmp:
        # Locally the adapter points to the sibling bases folder; repo and sha stay recorded for provenance.
        local_config = {**config, "bases": "../../bases", "bases_subfolder": None}
        (tmp / ADAPTER_CONFIG_NAME).write_bytes(config_json_bytes(local_config))
        _place(pulled.adapter_dir / ADAPTER_WEIGHTS_NAME, tmp / ADAPTER_WEIGHTS_NAME)
        if (pulled.adapter_dir / "README.md").is_file():
            _place(pulled.adapter_dir / "README.md", tmp / "README.md")
    pulled.adapter_dir, pulled.bases_dir = adapter_dir, bases_dir
    return pulled


def pull_adapter(
    repo_id: str,
    *,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    adapter_name: Optional[str] = None,
    local_dir: Optional[str | os.PathLike] = None,
    cache_dir: Optional[str | os.PathLike] = None,
    token: Optional[str] = None,
    endpoint: Optional[str] = None,
    local_files_only: bool = False,
) -> PulledAdapter:
    """Downloads one sigma adapter and the bases commit it pins, and verifies the bases' sha256.

    Args:
        repo_id: Hub repo of the adapter (or of the collection, with `subfolder`).
        subfolder: Folder of the adapter inside `repo_id` (single-repo collections: `"adapters/<name>"`).
        revision: Branch, tag or commit of the adapter (default: `main`).
        adapter_name: Name for `local_dir/adapters/<name>`; defaults to the repo name or folder name.
        local_dir: Also materialise a self-contained copy there (`bases/` + `adapters/<name>/`).
        cache_dir: huggingface_hub cache (default: `HF_HUB_CACHE`).
        token: Hub token (default: the usual huggingface_hub sources).
        endpoint: Hub endpoint (default: `HF_ENDPOINT`).
        local_files_only: Use the cache only (as with `HF_HUB_OFFLINE=1`).

    Returns:
        A `PulledAdapter`. Raises `PullError`, `BasesNotFoundError` or `BasesMismatchError` (never a partial result).
    """
    api = HfApi(endpoint=endpoint, token=token)
    hub_kwargs = {"cache_dir": cache_dir, "local_files_only": local_files_only}
    where = _describe(repo_id, subfolder, revision)
    adapter_dir, commit = _download_adapter(api, repo_id, subfolder, revision, hub_kwargs)
    config = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
    bases_repo, bases_subfolder, bases_revision = _bases_reference(config, repo_id, subfolder, where)
    name = adapter_name or posixpath.basename((subfolder or repo_id).rstrip("/"))
    if not bases_revision:
        bases_revision = _current_commit(api, bases_repo, commit if bases_repo == repo_id else None, name,
                                         local_files_only)
        logger.warning("%s does not pin its bases revision; using %s@%s.", where, bases_repo, bases_revision)
    bases_dir = _download_bases(api, bases_repo, bases_subfolder, str(bases_revision), name, hub_kwargs)
    fingerprint = _verify_bases(bases_dir, config, name, _describe(bases_repo, bases_subfolder, bases_revision))
    pulled = PulledAdapter(name, repo_id, subfolder, commit, adapter_dir, bases_repo, bases_subfolder,
                           str(bases_revision), bases_dir, fingerprint)
    return _materialise(pulled, config, Path(local_dir)) if local_dir is not None else pulled


def _http_failure(what: str, exc: HfHubHTTPError) -> PullError:
    status = exc.response.status_code if exc.response is not None else "?"
    return PullError(f"downloading {what} failed (HTTP {status}): {exc}. Nothing was returned; retry the pull (files "
                     "already in the cache are not downloaded again).")
