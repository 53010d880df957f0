"""Names of every file and folder of a JD-LoRA collection, and the one rule for names that become paths.

A collection on disk (or in one Hub repo) is::

    ROOT/
      bases/jd_bases_config.json, bases/jd_bases.safetensors, bases/README.md
      adapters/<name>/adapter_config.json, adapters/<name>/adapter_model.safetensors, adapters/<name>/README.md
      report.json                 (written by `peft-jd compress` / `add`)
      jd_collection.json          (Hub index, written last by `peft-jd push`)
      .peft-jd.json               (marker: written by peft-jd, with the kind of artefact; see `core.io`)

Writers lock `PARENT/.ROOT.peft-jd.lock` (beside the folder, so that the lock survives the folder's atomic swap).

Every other module spells these names through the constants and helpers here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import AdapterNameError


PEFT_TYPE = "JDLORA"

BASES_DIR = "bases"
ADAPTERS_DIR = "adapters"
REPORT_NAME = "report.json"
INDEX_NAME = "jd_collection.json"
CARD_NAME = "README.md"

BASES_CONFIG_NAME = "jd_bases_config.json"
BASES_WEIGHTS_NAME = "jd_bases.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# What a bases folder and an adapter folder need (their cards are optional), config first: what is downloaded,
# uploaded or copied together.
BASES_FILES = (BASES_CONFIG_NAME, BASES_WEIGHTS_NAME)
ADAPTER_FILES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)

MARKER_NAME = ".peft-jd.json"
LOCK_SUFFIX = ".peft-jd.lock"
# Kinds of folders peft-jd writes; a folder is replaced only by a writer of the same kind (or with overwrite).
KIND_COLLECTION = "collection"
KIND_LORA_EXPORT = "lora-export"
KIND_SIGMA_ADAPTER = "sigma-adapter"

SIGMA_KEY_SUFFIX = ".jd_sigma"
PEFT_KEY_PREFIX = "base_model.model."

# One path component: letters, digits, `_`, `-`, `.` (not leading), at most 200 characters. Adapter names from
# files or the network become folder names, so anything else (separators, `..`, control characters) is refused.
_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")


def check_path_component(name: object, what: str = "adapter name") -> str:
    """Returns `name` if it can be used as one folder name inside a collection, else raises `AdapterNameError`."""
    if not isinstance(name, str) or not _SAFE_COMPONENT.fullmatch(name) or name in (".", ".."):
        raise AdapterNameError(
            f"{what} {name!r} cannot be used as a folder name: use letters, digits, '_', '-' and '.' (not first), "
            "at most 200 characters."
        )
    return name


def confined_path(root: str | os.PathLike, *parts: str) -> Path:
    """`root/parts…`, refused with `AdapterNameError` if it resolves (symlinks included) outside `root`.

    Each part may hold `/`-separated components (a Hub subfolder); none may be absolute or `..`.
    """
    root_path = Path(root)
    components: list[str] = []
    for part in parts:
        if not isinstance(part, str) or part.startswith(("/", "\\")) or "\\" in part or "\x00" in part:
            raise AdapterNameError(f"path {part!r} must be relative, with '/' separators, inside {root_path}.")
        components += [c for c in part.split("/") if c not in ("", ".")]
    if ".." in components:
        raise AdapterNameError(f"path {'/'.join(parts)!r} leaves {root_path} ('..' is not allowed).")
    candidate = root_path.joinpath(*components)
    resolved_root = root_path.resolve()
    resolved = candidate.resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise AdapterNameError(f"{candidate} resolves to {resolved}, outside {resolved_root}; refusing to use it.")
    return candidate


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of writers of `target` (a sibling, so it outlives atomic swaps of `target`)."""
    target = Path(target)
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def bases_dir(root: str | os.PathLike) -> Path:
    return Path(root) / BASES_DIR


def adapters_dir(root: str | os.PathLike) -> Path:
    return Path(root) / ADAPTERS_DIR


def adapter_dir(root: str | os.PathLike, name: str) -> Path:
    """`root/adapters/<name>` for a checked `name`."""
    return confined_path(adapters_dir(root), check_path_component(name))


def report_path(root: str | os.PathLike) -> Path:
    return Path(root) / REPORT_NAME


def adapter_subfolder(name: str) -> str:
    """Folder of adapter `name` inside a collection repo (`adapters/<name>`)."""
    return f"{ADAPTERS_DIR}/{check_path_component(name)}"


def sigma_state_dict_key(module_key: str) -> str:
    """Key of a module's Σ in `adapter_model.safetensors`."""
    return f"{PEFT_KEY_PREFIX}{module_key}{SIGMA_KEY_SUFFIX}"


def is_collection_root(path: str | os.PathLike) -> bool:
    """A folder laid out as a collection: `bases/` with its config and an `adapters/` folder."""
    return (bases_dir(path) / BASES_CONFIG_NAME).is_file() and adapters_dir(path).is_dir()
