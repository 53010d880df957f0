"""`AdapterSpec`: what a sigma adapter's `adapter_config.json` says, parsed once for every consumer.

The PEFT tuner (`JDLoraConfig`), bulk loading, export, Hub pull and both serving engines read sigma adapters through
this class, so a field means the same thing everywhere and a malformed config gets the same error.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .errors import AdapterFormatError, BasesNotFoundError
from .io import read_json_object
from .layout import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_TYPE


SIGMA_TYPES = ("full", "diag")


def is_relative_reference(bases: str) -> bool:
    """A `bases` value like `./bases` or `../../bases`: relative to the adapter's own folder (local or in its repo)."""
    return bases in (".", "..") or bases.startswith(("./", "../"))


def resolve_relative_bases(
    bases: str,
    bases_subfolder: Optional[str],
    adapter_location: str,
    adapter_subfolder: Optional[str] = None,
    on_hub: Optional[bool] = None,
) -> tuple[str, Optional[str]]:
    """`(location, subfolder)` of bases referenced relatively by an adapter at `adapter_location[/adapter_subfolder]`.

    A local adapter folder gives a local path; a Hub adapter (`adapter_location` a repo id) gives a folder of the
    same repo, which must not leave it. `on_hub=None` tells them apart by whether the local folder exists.
    """
    local_adapter_dir = os.path.join(adapter_location, adapter_subfolder or "")
    if not on_hub and (on_hub is False or os.path.isdir(local_adapter_dir)):
        return os.path.normpath(os.path.join(local_adapter_dir, bases)), bases_subfolder
    folder = posixpath.normpath(posixpath.join(adapter_subfolder or "", bases, bases_subfolder or ""))
    if folder == ".." or folder.startswith("../") or folder.startswith("/"):
        raise BasesNotFoundError(
            f"adapter {adapter_location!r} points to bases {bases!r} outside its repo; set `bases` to the bases repo "
            "id instead."
        )
    return adapter_location, (None if folder == "." else folder)


def cluster_for(cluster: Union[int, Mapping[str, int]], module_key: str, adapter: str) -> int:
    """The cluster of an adapter for `module_key`, from a config's `cluster` (one id, or module key → id)."""
    if isinstance(cluster, Mapping):
        if module_key not in cluster:
            raise AdapterFormatError(
                f"adapter {adapter!r} has a Σ for module {module_key!r} but no cluster for it in its config's "
                "`cluster` map; the adapter files are inconsistent. Re-export the adapter."
            )
        return int(cluster[module_key])
    return int(cluster)


def _typed(config: Mapping[str, Any], key: str, kinds: tuple, default: Any, where: str) -> Any:
    value = config.get(key, default)
    if value is not None and not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        raise AdapterFormatError(f"{where}: `{key}` must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}.")
    return value


@dataclass
class AdapterSpec:
    """A JD-LoRA sigma adapter's config, checked.

    Args:
        name: Name of the adapter (used in messages and as its serving name).
        r: Rank of the bases (the largest, when modules have their own ranks).
        rank_pattern: Module key → rank for the modules whose rank differs from `r` (budgeted collections; PEFT's
            `rank_pattern` convention with exact module keys).
        sigma_type: `"full"` (r×r Σ) or `"diag"` (r-vector Σ).
        scaling: Multiplier of the update `U Σ Vᵀ`.
        bases: Local path or Hub repo id of the shared bases, already resolved if it was relative.
        bases_revision: Pinned commit of the bases repo.
        bases_subfolder: Folder of the bases inside `bases`.
        bases_fingerprint: sha256 of the bases weights the adapter was compressed against.
        cluster: One cluster id, or module key → cluster id.
        base_model_name_or_path: The base model the LoRAs were trained on.
        modules_to_save: Modules stored whole (not compressed) in the adapter file, as PEFT's `modules_to_save`.
        source: Where the config was read from, for messages.
        config: The raw config mapping.
        directory: The local adapter folder, when read with `from_directory`.
    """

    name: str
    r: int
    sigma_type: str
    scaling: float = 1.0
    rank_pattern: dict[str, int] = field(default_factory=dict)
    bases: Optional[str] = None
    bases_revision: Optional[str] = None
    bases_subfolder: Optional[str] = None
    bases_fingerprint: Optional[str] = None
    cluster: Union[int, dict[str, int]] = 0
    base_model_name_or_path: Optional[str] = None
    modules_to_save: Optional[list[str]] = None
    source: str = "<config>"
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    directory: Optional[str] = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], name: str, source: str = "<config>") -> AdapterSpec:
        """Parses a config mapping; raises `AdapterFormatError` naming `source` for anything malformed."""
        where = f"adapter {name!r} ({source})"
        if not isinstance(config, Mapping):
            raise AdapterFormatError(f"{where}: the config must be a JSON object, got {type(config).__name__}.")
        peft_type = str(getattr(config.get("peft_type"), "value", config.get("peft_type")) or "")
        if peft_type.upper() != PEFT_TYPE:
            raise AdapterFormatError(
                f"{where} has peft_type={config.get('peft_type')!r}, not {PEFT_TYPE!r}: it is not a JD-LoRA sigma "
                "adapter."
            )
        r = _typed(config, "r", (int,), None, where)
        sigma_type = config.get("sigma_type", "full")
        if r is None or r <= 0 or sigma_type not in SIGMA_TYPES:
            raise AdapterFormatError(f"{where}: invalid r={r!r} / sigma_type={sigma_type!r} in its config.")
        cluster = config.get("cluster", 0)
        valid_map = isinstance(cluster, Mapping) and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in cluster.items()
        )
        if not (valid_map or isinstance(cluster, int) and not isinstance(cluster, bool)):
            raise AdapterFormatError(
                f"{where}: `cluster` must be an int or a map of module key to int, got {cluster!r}."
            )
        scaling = _typed(config, "scaling", (int, float), 1.0, where)
        rank_pattern = _typed(config, "rank_pattern", (dict,), None, where) or {}
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v for v in rank_pattern.values()):
            raise AdapterFormatError(f"{where}: `rank_pattern` must map module keys to positive ints, got "
                                     f"{rank_pattern!r}.")
        strings = {
            key: _typed(config, key, (str,), None, where)
            for key in ("bases", "bases_revision", "bases_subfolder", "bases_fingerprint", "base_model_name_or_path")
        }
        modules_to_save = _typed(config, "modules_to_save", (list, tuple, set), None, where)
        return cls(
            name=name,
            r=r,
            sigma_type=sigma_type,
            scaling=float(1.0 if scaling is None else scaling),
            rank_pattern=dict(rank_pattern),
            cluster=dict(cluster) if isinstance(cluster, Mapping) else cluster,
            modules_to_save=sorted(modules_to_save) if modules_to_save else None,
            source=source,
            config=dict(config),
            **{key: (value or None) for key, value in strings.items()},
        )

    @classmethod
    def from_directory(
        cls, directory: str | os.PathLike, name: Optional[str] = None, hub_repo: Optional[str] = None,
        hub_subfolder: Optional[str] = None, hub_revision: Optional[str] = None,
    ) -> AdapterSpec:
        """Reads `directory/adapter_config.json`, resolving a relative `bases` against the adapter's location.

        Args:
            directory: Local folder of the adapter.
            name: Adapter name; defaults to the folder name.
            hub_repo: Set when `directory` is a Hub download: relative bases then resolve inside that repo,
                at `hub_subfolder`, pinned to `hub_revision`.
        """
        directory = os.fspath(directory)
        name = name or os.path.basename(os.path.normpath(directory))
        path = os.path.join(directory, ADAPTER_CONFIG_NAME)
        spec = cls.from_config(read_json_object(path, f"adapter {name!r}"), name, source=path)
        spec.directory = directory
        if spec.bases and is_relative_reference(spec.bases):
            if hub_repo is None:
                spec.bases, spec.bases_subfolder = resolve_relative_bases(
                    spec.bases, spec.bases_subfolder, directory, on_hub=False
                )
            else:
                spec.bases, spec.bases_subfolder = resolve_relative_bases(
                    spec.bases, spec.bases_subfolder, hub_repo, hub_subfolder, on_hub=True
                )
                spec.bases_revision = spec.bases_revision or hub_revision
        return spec

    def cluster_of(self, module_key: str) -> int:
        """Cluster of this adapter for `module_key`."""
        return cluster_for(self.cluster, module_key, self.name)

    def rank_of(self, module_key: str) -> int:
        """Rank of this adapter's Σ for `module_key`."""
        return self.rank_pattern.get(module_key, self.r)

    def sigma_shape(self, module_key: str | None = None) -> tuple[int, ...]:
        """Shape the Σ of `module_key` must have (of a module with the adapter's `r` when not given)."""
        r = self.r if module_key is None else self.rank_of(module_key)
        return (r, r) if self.sigma_type == "full" else (r,)

    @property
    def weights_path(self) -> Optional[str]:
        """`adapter_model.safetensors` in the adapter's folder (`None` for a spec not read from a folder)."""
        return os.path.join(self.directory, ADAPTER_WEIGHTS_NAME) if self.directory else None

    def bases_reference(self) -> tuple[str, Optional[str], Optional[str]]:
        """`(location, revision, subfolder)` of the bases, as `load_shared_bases` takes them."""
        if not self.bases:
            raise BasesNotFoundError(
                f"adapter {self.name!r} ({self.source}) has no `bases` in its config; it cannot be used without its "
                "shared bases."
            )
        return self.bases, self.bases_revision, self.bases_subfolder


def is_jd_adapter_dir(directory: str | os.PathLike) -> bool:
    """True when `directory` holds an adapter config whose `peft_type` is `JDLORA` (cheap; nothing is validated)."""
    try:
        with open(os.path.join(directory, ADAPTER_CONFIG_NAME), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and str(data.get("peft_type", "")).upper() == PEFT_TYPE


def adapter_weights_path(directory: str | os.PathLike) -> str:
    return os.path.join(directory, ADAPTER_WEIGHTS_NAME)
