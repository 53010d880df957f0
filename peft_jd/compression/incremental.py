"""`extend_collection(...)`: project new LoRAs onto an existing collection's bases without touching what is there."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..core import (
    ADAPTER_CONFIG_NAME,
    BASES_CONFIG_NAME,
    BASES_WEIGHTS_NAME,
    BasesConfig,
    BasesMismatchError,
    file_sha256,
    write_sigma_adapter,
)
from ..tuner.config import JDLoraConfig
from .algorithms import project_stack
from .engine import (
    ADAPTERS_DIR,
    BASES_DIR,
    adapter_card,
    jd_target_modules,
    natural_key,
    sizes_entry,
)
from .lora_io import CollectionSpec, HubOptions, check_collection, load_loras
from .report import CompressionReport, adapter_entry, summarize
from .stack import read_module_stack


logger = logging.getLogger(__name__)


def _existing_target_modules(collection: Path) -> list[str] | None:
    for config_path in sorted((collection / ADAPTERS_DIR).glob(f"*/{ADAPTER_CONFIG_NAME}")):
        target_modules = json.loads(config_path.read_text(encoding="utf-8")).get("target_modules")
        if target_modules:
            return sorted(target_modules, key=natural_key) if isinstance(target_modules, list) else target_modules
    return None


def extend_collection(
    collection: str | os.PathLike,
    adapters: Iterable[str | os.PathLike],
    warn_error: float = 0.6,
    overwrite: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    progress: bool = True,
) -> CompressionReport:
    """Projects new LoRAs onto the bases of an existing collection and writes their sigma adapters.

    Each new adapter gets, per module, the cluster whose bases keep most of its update and the optimal Σ there
    (`Uᵀ ΔW V` for JD-Full; least squares for JD-Diag). Existing adapters and the bases are left untouched;
    `report.json` gains the new entries.

    Args:
        collection: Folder written by `compress`.
        adapters: New LoRAs (same forms as for `compress`).
        warn_error: Warn (and record in the report) when an adapter's mean err² exceeds this; such adapters are
            poorly represented by the existing bases and a re-compression of the collection is advised.
        overwrite: Replace adapters of the same name instead of refusing.
        revision: Default Hub revision of Hub adapters.
        token: Hub token.
        cache_dir: Hub cache folder.
        local_files_only: Use only already downloaded Hub files.
        progress: Show a progress bar.

    Returns:
        The updated [`CompressionReport`] of the whole collection.
    """
    start = time.perf_counter()
    collection = Path(collection)
    bases_dir = collection / BASES_DIR
    if not (bases_dir / BASES_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{collection} has no {BASES_DIR}/{BASES_CONFIG_NAME}; not a peft-jd collection.")
    bases_config = BasesConfig.from_file(bases_dir / BASES_CONFIG_NAME)
    if bases_config.method == "svd":
        raise ValueError(
            f"{collection} was compressed with method 'svd' (one basis per adapter); there are no shared bases to "
            "project onto. Re-run `peft-jd compress` with the new adapters included."
        )
    weights_path = bases_dir / BASES_WEIGHTS_NAME
    if bases_config.fingerprint and file_sha256(weights_path) != bases_config.fingerprint:
        raise BasesMismatchError(f"{weights_path} does not match the fingerprint in its config; it was modified.")
    report = CompressionReport.load(collection)
    loras = load_loras(adapters, HubOptions(revision, token, cache_dir, local_files_only))
    reference = CollectionSpec(
        base_model_name_or_path=bases_config.base_model_name_or_path,
        module_shapes={k: (m.in_features, m.out_features) for k, m in bases_config.modules.items()},
        target_modules=bases_config.target_modules,
        task_type=report.data.get("task_type"),
    )
    spec = check_collection(loras, reference)
    taken = sorted({a.name for a in loras} & (set(report.adapters) | {p.name for p in (collection / ADAPTERS_DIR)
                                                                     .iterdir()}))
    if taken and not overwrite:
        raise FileExistsError(f"adapters {taken} already exist in {collection}; rename them (NAME=SOURCE) or pass "
                              "overwrite=True / --overwrite.")
    module_keys = sorted(spec.module_shapes, key=natural_key)
    diagonal = bases_config.sigma_type == "diag"
    sigmas = {a.name: {} for a in loras}
    clusters = {a.name: {} for a in loras}
    errors2 = {a.name: {} for a in loras}
    with safe_open(weights_path, framework="pt") as handle:
        for module_key in tqdm(module_keys, desc="project", unit="module", disable=not progress):
            U = handle.get_tensor(f"{module_key}.U").float()
            V = handle.get_tensor(f"{module_key}.V").float()
            cluster, sigma, err2 = project_stack(read_module_stack(loras, module_key), U, V, diagonal)
            for i, adapter in enumerate(loras):
                sigmas[adapter.name][module_key] = sigma[i].clone()
                clusters[adapter.name][module_key] = int(cluster[i])
                errors2[adapter.name][module_key] = float(err2[i])
    target_modules = _existing_target_modules(collection) or jd_target_modules(loras, spec)
    sigma_size = bases_config.r**2 if not diagonal else bases_config.r
    for adapter in loras:
        per_module = clusters[adapter.name]
        ids = set(per_module.values())
        config = JDLoraConfig(
            r=bases_config.r, sigma_type=bases_config.sigma_type, target_modules=target_modules,
            bases=f"../../{BASES_DIR}", bases_fingerprint=bases_config.fingerprint,
            cluster=next(iter(ids)) if len(ids) == 1 else dict(per_module),
            base_model_name_or_path=bases_config.base_model_name_or_path, task_type=spec.task_type,
            inference_mode=True,
        )
        entry = adapter_entry(adapter.source, errors2[adapter.name], per_module, adapter.lora_params(),
                              sigma_size * len(module_keys), added=True)
        write_sigma_adapter(collection / ADAPTERS_DIR / adapter.name, sigmas.pop(adapter.name), config,
                                adapter_card(adapter.source, bases_config.method, bases_config.r, entry))
        report.adapters[adapter.name] = entry
        if entry["mean_err2"] > warn_error:
            message = (
                f"adapter {adapter.name!r}: mean err² {entry['mean_err2']:.3f} on the existing bases exceeds "
                f"{warn_error} (collection mean {report.mean_err2:.3f}); the bases do not represent it well. "
                "Re-compressing the collection with this adapter included is advised."
            )
            warnings.warn(message, UserWarning, stacklevel=2)
            report.warnings.append(message)
    _refresh(report, bases_config, sigma_size, len(module_keys), time.perf_counter() - start)
    report.save()
    return report


def _refresh(report: CompressionReport, bases_config: BasesConfig, sigma_size: int, num_modules: int,
             seconds: float) -> None:
    entries = report.adapters
    bases_params = sum(m.num_clusters * bases_config.r * (m.in_features + m.out_features)
                       for m in bases_config.modules.values())
    report.data["num_adapters"] = len(entries)
    report.data["summary"] = summarize(entries)
    report.data["sizes"] = sizes_entry(sum(e["lora_params"] for e in entries.values()), bases_params,
                                       sigma_size * num_modules * len(entries), sigma_size)
    report.data.setdefault("timings", {}).setdefault("add_s", []).append(seconds)


def bases_tensor(collection: str | os.PathLike, module_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(U, V)` of one module of a collection's bases (for inspection and tests)."""
    with safe_open(Path(collection) / BASES_DIR / BASES_WEIGHTS_NAME, framework="pt") as handle:
        return handle.get_tensor(f"{module_key}.U"), handle.get_tensor(f"{module_key}.V")
