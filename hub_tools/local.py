"""The local side of a push: reading and checking a compressed collection folder (`OUT/` of `peft-jd compress`).

A push uploads only what the format names (`bases/` config and weights, each `adapters/<name>/` config and weights,
`report.json`), and each of them only if it is a regular file inside the collection (no symbolic link anywhere on
its path: a link could expose a file from elsewhere, a token for instance) whose content is what the format says:
the bases weights hold exactly the `<module>.U` / `<module>.V` tensors of the bases config, each sigma adapter passes
`peft_jd.core.validate_against_bases`, the JSON files are objects. Hidden entries (`.tmp-*`, `.trash-*` folders of
in-flight or interrupted writes, the `.peft-jd.json` marker) are never read.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from safetensors import SafetensorError, safe_open

from peft_jd.compression.report import CompressionReport
from peft_jd.core import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    ADAPTERS_DIR,
    BASES_CONFIG_NAME,
    BASES_DIR,
    BASES_WEIGHTS_NAME,
    REPORT_NAME,
    AdapterSpec,
    BasesConfig,
    JDLoraError,
    check_path_component,
    confined_path,
    file_sha256,
    read_adapter_tensors,
    read_json_object,
    validate_against_bases,
)

from .errors import CollectionError


_VERIFIED: dict[tuple[str, int, int], str] = {}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def verified_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in this process (bases files can be GBs)."""
    stat_result = os.stat(path)
    key = (os.path.realpath(path), stat_result.st_size, stat_result.st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = file_sha256(path)
    return _VERIFIED[key]


def config_json_bytes(config: dict) -> bytes:
    """Serialises an adapter config exactly like PEFT's `save_pretrained` (stable bytes: re-push is a no-op)."""
    return json.dumps(config, indent=2, sort_keys=True).encode("utf-8")


@dataclass
class LocalAdapter:
    """One sigma adapter folder of a local collection, checked against the collection's bases."""

    name: str
    directory: Path
    config: dict[str, Any]

    @property
    def weights(self) -> Path:
        return self.directory / ADAPTER_WEIGHTS_NAME

    def config_for_hub(self, bases: str, bases_revision: str, bases_subfolder: Optional[str]) -> bytes:
        """The adapter config rewritten to point at the pushed bases, pinned to their commit."""
        config = dict(self.config)
        config.update(bases=bases, bases_revision=bases_revision, bases_subfolder=bases_subfolder)
        return config_json_bytes(config)


@dataclass
class LocalCollection:
    """A compressed collection on disk: `bases/`, `adapters/<name>/` and an optional `report.json`."""

    root: Path
    bases_config: BasesConfig
    adapters: dict[str, LocalAdapter]
    report: Optional[CompressionReport] = None

    @property
    def bases_dir(self) -> Path:
        return self.root / BASES_DIR

    @property
    def fingerprint(self) -> str:
        return self.bases_config.fingerprint


def _no_links(root: Path, parts: Sequence[str]) -> Path:
    """`root/parts…`, refused with `CollectionError` if it leaves `root` or any component below `root` is a link."""
    current = root
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise CollectionError(
                f"{current} is a symbolic link; push uploads only regular files of the collection (a link could "
                "expose a file from elsewhere, e.g. a token). Replace the link by a copy of what it points to."
            )
    try:
        return confined_path(root, *parts)
    except JDLoraError as exc:
        raise CollectionError(f"{exc} Only files inside the collection are pushed.") from None


def _regular_file(root: Path, *parts: str, missing: str) -> Path:
    """A regular file inside the collection (see `_no_links`); `missing` is the message when it does not exist."""
    path = _no_links(root, parts)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise CollectionError(missing) from None
    if not stat.S_ISREG(mode):
        raise CollectionError(f"{path} is not a regular file; push uploads only regular files of the collection.")
    return path


def _check_bases_tensors(path: Path, config: BasesConfig) -> None:
    """The bases weights hold exactly `<module>.U` (c, out, r) and `<module>.V` (c, in, r) per module, as floats."""
    expected = {}
    for module_key, spec in config.modules.items():
        expected[f"{module_key}.U"] = (spec.num_clusters, spec.out_features, config.rank_of(module_key))
        expected[f"{module_key}.V"] = (spec.num_clusters, spec.in_features, config.rank_of(module_key))
    try:
        with safe_open(path, framework="pt") as f:
            found = {key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype()) for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CollectionError(f"{path} is not a readable safetensors file ({exc}); re-run `peft-jd compress`."
                              ) from exc
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CollectionError(
            f"{path} does not hold the tensors its config {BASES_CONFIG_NAME} lists (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); the bases folder is inconsistent. Re-run `peft-jd compress`."
        )
    for key, shape in expected.items():
        if found[key][0] != shape or found[key][1] not in _FLOAT_DTYPES:
            raise CollectionError(
                f"{path}: tensor {key} has shape {found[key][0]} and dtype {found[key][1]}, but the bases config "
                f"says {shape} (float); the bases folder is inconsistent. Re-run `peft-jd compress`."
            )


def _read_bases(root: Path) -> BasesConfig:
    def missing(file_name: str) -> str:
        return (f"{root} is not a compressed collection: {root / BASES_DIR / file_name} is missing. Point to the "
                f"output folder of `peft-jd compress` (it holds {BASES_DIR}/ and {ADAPTERS_DIR}/).")

    config_path = _regular_file(root, BASES_DIR, BASES_CONFIG_NAME, missing=missing(BASES_CONFIG_NAME))
    weights_path = _regular_file(root, BASES_DIR, BASES_WEIGHTS_NAME, missing=missing(BASES_WEIGHTS_NAME))
    try:
        config = BasesConfig.from_file(config_path)
    except JDLoraError as exc:
        raise CollectionError(f"{exc} Re-run `peft-jd compress`.") from exc
    actual = verified_sha256(weights_path)
    if config.fingerprint and actual != config.fingerprint:
        raise CollectionError(
            f"{weights_path} has sha256 {actual[:12]}… but its config records {config.fingerprint[:12]}…: the bases "
            "were modified after compression. Re-run `peft-jd compress`."
        )
    _check_bases_tensors(weights_path, config)
    config.fingerprint = config.fingerprint or actual
    return config


def _read_adapter(root: Path, name: str, bases: BasesConfig) -> LocalAdapter:
    def missing(file_name: str) -> str:
        return f"adapter {name!r}: {root / ADAPTERS_DIR / name / file_name} is missing; re-run the compression."

    config_path = _regular_file(root, ADAPTERS_DIR, name, ADAPTER_CONFIG_NAME, missing=missing(ADAPTER_CONFIG_NAME))
    weights_path = _regular_file(root, ADAPTERS_DIR, name, ADAPTER_WEIGHTS_NAME, missing=missing(ADAPTER_WEIGHTS_NAME))
    try:
        config = read_json_object(config_path, f"adapter {name!r}")
        spec = AdapterSpec.from_config(config, name, source=str(config_path))
        sigmas, _saved = read_adapter_tensors(spec, weights_path)
        validate_against_bases(spec, sigmas, bases, bases_label=f"in {root / BASES_DIR}")
    except JDLoraError as exc:
        raise CollectionError(
            f"adapter {name!r} cannot be pushed: {exc} (Only compressed sigma adapters of this collection's bases are "
            "pushed; fix or remove the folder.)"
        ) from exc
    return LocalAdapter(name, root / ADAPTERS_DIR / name, config)


def _adapter_names(root: Path) -> list[str]:
    folder = _no_links(root, [ADAPTERS_DIR])
    if not folder.is_dir():
        return []
    names = []
    for entry in os.scandir(folder):
        # Hidden entries are in-flight or abandoned atomic writes (`.tmp-*`, `.trash-*`) or markers, never adapters.
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            raise CollectionError(
                f"{entry.path} is a symbolic link; push uploads only adapters stored inside the collection. Replace "
                "the link by a copy of the adapter folder."
            )
        if entry.is_dir(follow_symlinks=False):
            try:
                names.append(check_path_component(entry.name))
            except JDLoraError as exc:
                raise CollectionError(f"{entry.path}: {exc} Rename the folder.") from None
    return sorted(names)


def _read_report(root: Path) -> Optional[CompressionReport]:
    """The collection's report (None if it has none); `CollectionError` if it is not a peft-jd compression report."""
    if not os.path.lexists(root / REPORT_NAME):
        return None
    path = _regular_file(root, REPORT_NAME, missing=f"{root / REPORT_NAME} vanished while reading the collection.")
    try:
        return CompressionReport.load(path)
    except JDLoraError as exc:
        raise CollectionError(
            f"{exc} Push uploads {REPORT_NAME} as it is: fix it, or delete it (it is optional)."
        ) from exc


def read_collection(root: str | os.PathLike, names: Optional[Sequence[str]] = None) -> LocalCollection:
    """Reads and checks a local collection (see the module docstring for what is checked).

    Args:
        root: The collection folder (`bases/`, `adapters/<name>/`, optional `report.json`).
        names: Only these adapters (default: all). Unknown names raise `CollectionError`.

    Returns:
        The collection, with the bases fingerprint verified against the weights file.
    """
    root = Path(root)
    if not root.is_dir():
        raise CollectionError(f"collection folder {root} does not exist.")
    bases = _read_bases(root)
    found = _adapter_names(root)
    if names is not None:
        unknown = [n for n in names if n not in found]
        if unknown:
            raise CollectionError(
                f"adapter(s) {unknown[:10]} are not in {root / ADAPTERS_DIR} (it has {len(found)}: {found[:10]}…)."
            )
        found = list(dict.fromkeys(names))
    if not found:
        raise CollectionError(f"{root / ADAPTERS_DIR} holds no adapters; nothing to push.")
    adapters = {name: _read_adapter(root, name, bases) for name in found}
    return LocalCollection(root, bases, adapters, _read_report(root))
