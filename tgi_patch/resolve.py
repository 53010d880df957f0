"""Resolving and validating the launcher's JD adapters before TGI starts: every adapter ends up as a local directory
checked against one local bases directory, so that a typo or a broken adapter fails at launch, not at request time.

Adapter entries (`--jd-lora-adapters`, comma-separated, TGI's syntax plus an `hf:` form):

* `name=/local/dir`: a local sigma adapter directory;
* `name=hf:owner/repo/sub/folder@rev`: a folder of a Hub repo (e.g. one adapter of a pushed collection);
* `owner/repo` or `owner/repo@rev`: a Hub repo holding one adapter at its root (requests use `owner/repo`);
* a local directory path alone (requests use the path).

Collections (`--jd-lora-collection DIR` or `owner/repo[@rev]`): every `adapters/<name>/` folder, served as `<name>`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

from peft_jd.core import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    ADAPTERS_DIR,
    BASES_CONFIG_NAME,
    BASES_WEIGHTS_NAME,
    AdapterFormatError,
    AdapterSpec,
    BasesConfig,
    BasesNotFoundError,
    adapter_dir,
    adapter_subfolder,
    adapters_dir,
    hub_download,
    is_jd_adapter_dir,
    looks_like_local_path,
)

from .adapter_files import HubOrigin, load_sigmas, read_spec


class LaunchError(ValueError):
    """A launcher argument or adapter is invalid; the message says which and how to fix it."""


@dataclass
class AdapterEntry:
    """One requested JD adapter: its request name and where it is (local path, or Hub repo + folder + revision)."""

    name: str
    path: Optional[str] = None
    repo_id: Optional[str] = None
    subfolder: Optional[str] = None
    revision: Optional[str] = None


@dataclass
class ResolvedAdapter:
    """A validated JD adapter: request name, local directory, and the local bases directory it is served with."""

    name: str
    directory: str
    bases_dir: str
    bases_identity: str


_NAME_RE = re.compile(r"^[^=@,]+$")


def parse_adapter_entries(value: str) -> list[AdapterEntry]:
    """Parses a comma-separated `--jd-lora-adapters` value (see the module docstring)."""
    entries = []
    for raw in value.split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, target = item.partition("=")
        name = name.strip()
        if not sep:
            target, _, revision = item.partition("@")
            if os.path.isdir(target):
                entries.append(AdapterEntry(name=target, path=target))
            else:
                entries.append(AdapterEntry(name=target, repo_id=target, revision=revision or None))
        elif target.startswith("hf:"):
            location, _, revision = target[3:].partition("@")
            parts = location.strip("/").split("/")
            if len(parts) < 2:
                raise LaunchError(f"JD adapter entry {item!r}: write hf:owner/repo[/folder][@revision].")
            entries.append(AdapterEntry(name=name, repo_id="/".join(parts[:2]), subfolder="/".join(parts[2:]) or None,
                                        revision=revision or None))
        else:
            entries.append(AdapterEntry(name=name, path=target))
        if not _NAME_RE.match(entries[-1].name):
            raise LaunchError(f"JD adapter entry {item!r}: the adapter name may not contain '=', '@' or ','.")
    return entries


def _hub_adapter_names(repo_id: str, revision: Optional[str]) -> list[str]:
    """Names of the `adapters/<name>/` folders of a Hub collection (downloads their configs only).

    `peft_jd.core.hub_download` fetches known file names; listing a repo's folders needs `snapshot_download`.
    """
    from huggingface_hub import snapshot_download

    pattern = f"{ADAPTERS_DIR}/*/{ADAPTER_CONFIG_NAME}"
    try:
        root = snapshot_download(repo_id, revision=revision, allow_patterns=[pattern])
    except Exception as exc:  # noqa: BLE001 - any download failure is a launch error naming the repo
        raise LaunchError(
            f"cannot list the adapters of Hub collection {repo_id!r}@{revision or 'main'}: {exc}"
        ) from exc
    return _adapter_names(root)


def _adapter_names(root: str) -> list[str]:
    folder = adapters_dir(root)
    names = sorted(os.listdir(folder)) if folder.is_dir() else []
    return [name for name in names if (folder / name / ADAPTER_CONFIG_NAME).is_file()]


def entry_directory(entry: AdapterEntry) -> tuple[str, Optional[HubOrigin]]:
    """Local directory of an adapter entry, and its Hub origin when its two files were downloaded from the Hub."""
    if entry.path is not None:
        if not os.path.isdir(entry.path):
            raise LaunchError(f"JD adapter {entry.name!r}: directory {entry.path!r} does not exist.")
        return os.path.abspath(entry.path), None
    paths = hub_download(entry.repo_id, [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME], subfolder=entry.subfolder,
                         revision=entry.revision, what="JD-LoRA adapter")
    return os.path.dirname(paths[0]), HubOrigin(entry.repo_id, entry.subfolder, entry.revision)


def collection_entries(collection: str) -> list[AdapterEntry]:
    """All adapters of a collection (local directory or Hub repo `owner/repo[@rev]`), named by their folder."""
    if os.path.isdir(collection):
        entries = [AdapterEntry(name=name, path=str(adapter_dir(collection, name)))
                   for name in _adapter_names(collection)]
    else:
        repo_id, _, revision = collection.partition("@")
        entries = [AdapterEntry(name=name, repo_id=repo_id, subfolder=adapter_subfolder(name),
                                revision=revision or None) for name in _hub_adapter_names(repo_id, revision or None)]
    if not entries:
        raise LaunchError(f"JD collection {collection!r} has no {ADAPTERS_DIR}/<name>/{ADAPTER_CONFIG_NAME}.")
    return entries


def bases_directory(spec: AdapterSpec, override: Optional[str]) -> str:
    """Local bases directory of an adapter (the override, a local reference, or a Hub download)."""
    if override:
        if not os.path.isdir(override):
            raise LaunchError(f"--jd-lora-bases {override!r} is not a directory.")
        return os.path.abspath(override)
    location, revision, subfolder = spec.bases_reference()
    local = os.path.join(location, subfolder or "")
    if os.path.isdir(local):
        return os.path.abspath(local)
    if looks_like_local_path(location):
        raise LaunchError(f"JD adapter {spec.name!r}: its bases directory {local!r} does not exist.")
    paths = hub_download(location, [BASES_CONFIG_NAME, BASES_WEIGHTS_NAME], subfolder=subfolder, revision=revision,
                         what="bases", error_cls=BasesNotFoundError)
    return os.path.dirname(paths[0])


def _read_launch_spec(entry: AdapterEntry, directory: str, origin: Optional[HubOrigin],
                      bases_override: Optional[str]) -> AdapterSpec:
    try:
        return read_spec(entry.name, directory, origin, bases_override)
    except AdapterFormatError as exc:
        if is_jd_adapter_dir(directory) or not os.path.isfile(os.path.join(directory, ADAPTER_CONFIG_NAME)):
            raise
        raise AdapterFormatError(
            f"{exc} Pass plain LoRA adapters with --lora-adapters and JD-LoRA sigma adapters with --jd-lora-adapters."
        ) from exc


def validate_adapter(entry: AdapterEntry, bases_override: Optional[str] = None) -> ResolvedAdapter:
    """Resolves an entry to local directories and validates it against its bases as the shards will load it.

    Σ are read whole (they are r×r per module, cheap) so that NaN/inf values fail at launch too.

    Raises:
        LaunchError or a `peft_jd` error naming the adapter, file and fix.
    """
    directory, origin = entry_directory(entry)
    spec = _read_launch_spec(entry, directory, origin, bases_override)
    bases_dir = bases_directory(spec, bases_override)
    config_path = os.path.join(bases_dir, BASES_CONFIG_NAME)
    for path in (config_path, os.path.join(bases_dir, BASES_WEIGHTS_NAME)):
        if not os.path.isfile(path):
            raise LaunchError(f"JD adapter {entry.name!r}: bases file {path} does not exist.")
    bases_config = BasesConfig.from_file(config_path)
    load_sigmas(spec, directory, bases_config, bases_dir)
    return ResolvedAdapter(entry.name, directory, bases_dir, bases_config.fingerprint or bases_dir)


def validate_all(entries: list[AdapterEntry], bases_override: Optional[str], lora_ids: list[str]
                 ) -> list[ResolvedAdapter]:
    """Validates every entry; names must be unique and distinct from plain LoRA ids, and one bases collection
    must serve all of them (TGI serves one model; the patch serves one JD collection per server)."""
    if not entries:
        return []
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(lora_ids)))
    if duplicates:
        raise LaunchError(f"adapter id(s) {duplicates} are given more than once; every adapter id must be unique.")
    resolved = [validate_adapter(entry, bases_override) for entry in entries]
    identities = {r.bases_identity for r in resolved}
    if len(identities) > 1:
        groups = {i: [r.name for r in resolved if r.bases_identity == i][:3] for i in identities}
        raise LaunchError(
            f"the JD adapters use {len(identities)} different bases collections ({groups}); one server serves one "
            "collection. Start one server per collection."
        )
    return resolved
