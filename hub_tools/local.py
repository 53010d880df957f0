"""The local side of a push: reading and checking a compressed collection folder (`OUT/` of `peft-jd compress`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from peft_jd.core import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    BASES_CONFIG_NAME,
    BASES_WEIGHTS_NAME,
    BasesConfig,
    file_sha256,
)

from .errors import CollectionError
from .report import REPORT_NAME, CollectionReport, read_report


_VERIFIED: dict[tuple[str, int, int], str] = {}


def verified_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in this process (bases files can be GBs)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = file_sha256(path)
    return _VERIFIED[key]


def config_json_bytes(config: dict) -> bytes:
    """Serialises an adapter config exactly like PEFT's `save_pretrained` (stable bytes: re-push is a no-op)."""
    return json.dumps(config, indent=2, sort_keys=True).encode("utf-8")


@dataclass
class LocalAdapter:
    """One sigma adapter folder of a local collection."""

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
    report: CollectionReport

    @property
    def bases_dir(self) -> Path:
        return self.root / "bases"

    @property
    def fingerprint(self) -> str:
        return self.bases_config.fingerprint

    @property
    def report_path(self) -> Optional[Path]:
        path = self.root / REPORT_NAME
        return path if path.is_file() else None


def _read_bases(root: Path) -> BasesConfig:
    bases_dir = root / "bases"
    for name in (BASES_CONFIG_NAME, BASES_WEIGHTS_NAME):
        if not (bases_dir / name).is_file():
            raise CollectionError(
                f"{root} is not a compressed collection: {bases_dir / name} is missing. Point to the output folder of "
                "`peft-jd compress` (it holds bases/ and adapters/)."
            )
    config = BasesConfig.from_file(bases_dir / BASES_CONFIG_NAME)
    actual = verified_sha256(bases_dir / BASES_WEIGHTS_NAME)
    if config.fingerprint and actual != config.fingerprint:
        raise CollectionError(
            f"{bases_dir / BASES_WEIGHTS_NAME} has sha256 {actual[:12]}… but its config records "
            f"{config.fingerprint[:12]}…: the bases were modified after compression. Re-run `peft-jd compress`."
        )
    config.fingerprint = config.fingerprint or actual
    return config


def _read_adapter(directory: Path, bases: BasesConfig) -> LocalAdapter:
    name = directory.name
    for file_name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        if not (directory / file_name).is_file():
            raise CollectionError(f"adapter {name!r}: {directory / file_name} is missing; re-run the compression.")
    try:
        config = json.loads((directory / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CollectionError(f"adapter {name!r}: {directory / ADAPTER_CONFIG_NAME} is not JSON ({exc}).") from exc
    if config.get("peft_type") != "JDLORA":
        raise CollectionError(
            f"adapter {name!r}: peft_type is {config.get('peft_type')!r}, not 'JDLORA'; only compressed sigma "
            "adapters can be pushed with `peft-jd push`."
        )
    recorded = config.get("bases_fingerprint")
    if recorded and recorded != bases.fingerprint:
        raise CollectionError(
            f"adapter {name!r} was compressed against bases {recorded[:12]}…, but {directory.parent.parent / 'bases'} "
            f"holds {bases.fingerprint[:12]}…. Re-project it onto these bases with `peft-jd add`, or remove it."
        )
    if config.get("r") != bases.r or config.get("sigma_type") != bases.sigma_type:
        raise CollectionError(
            f"adapter {name!r} has r={config.get('r')}, sigma_type={config.get('sigma_type')!r} but the bases have "
            f"r={bases.r}, sigma_type={bases.sigma_type!r}; it does not belong to this collection."
        )
    return LocalAdapter(name, directory, config)


def read_collection(root: str | os.PathLike, names: Optional[Sequence[str]] = None) -> LocalCollection:
    """Reads and checks a local collection.

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
    adapters_dir = root / "adapters"
    found = []
    if adapters_dir.is_dir():
        # Hidden entries are in-flight or abandoned atomic writes (`.tmp-*`, `.trash-*`), never adapters.
        found = sorted(p for p in adapters_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if names is not None:
        available = {p.name: p for p in found}
        unknown = [n for n in names if n not in available]
        if unknown:
            raise CollectionError(
                f"adapter(s) {unknown[:10]} are not in {adapters_dir} (it has {len(available)}: "
                f"{sorted(available)[:10]}…)."
            )
        found = [available[n] for n in names]
    if not found:
        raise CollectionError(f"{adapters_dir} holds no adapters; nothing to push.")
    adapters = {p.name: _read_adapter(p, bases) for p in found}
    return LocalCollection(root, bases, adapters, read_report(root / REPORT_NAME))
