"""`extend_collection(...)`: project new LoRAs onto an existing collection's bases, as one atomic change.

The whole run holds the collection's writers' lock; the new collection (hard links of the current files, the new
sigma adapters, the new `report.json`) is built in a temporary sibling and swapped in at once, so the report and the
adapters change together or not at all, also when the process is killed.
"""

from __future__ import annotations

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
    KIND_COLLECTION,
    AdapterFormatError,
    BasesConfig,
    BasesMismatchError,
    DestinationError,
    adapters_dir,
    atomic_directory,
    bases_dir,
    file_sha256,
    is_collection_root,
    read_json_object,
    recover_interrupted_swap,
    report_path,
    writer_lock,
)
from .algorithms import project_stack
from .cards import collection_adapter_card
from .engine import jd_target_modules, natural_key
from .lora_io import CollectionSpec, HubOptions, LoraAdapter, check_collection, load_loras
from .report import CompressionReport, adapter_entry
from .sizes import STORAGE_DTYPES, bases_values, sigma_values
from .stack import read_module_stack
from .writer import link_tree, stray_adapters, write_collection_adapter


logger = logging.getLogger(__name__)


def _existing_target_modules(collection: Path) -> list[str] | None:
    for config_path in sorted(adapters_dir(collection).glob(f"*/{ADAPTER_CONFIG_NAME}")):
        target_modules = read_json_object(config_path, "sigma adapter config").get("target_modules")
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
    `report.json` gains the new entries. The change is atomic (all new adapters and the report, or nothing) and
    holds the collection's writers' lock, so concurrent `add`/`compress` runs wait for each other.

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
    collection = Path(os.path.abspath(collection))
    loras = load_loras(adapters, HubOptions(revision, token, cache_dir, local_files_only))
    with writer_lock(collection):
        # Under the lock, so a concurrent writer's temporary folder is not taken for a crash leftover.
        recover_interrupted_swap(collection)
        bases_config, report = _read_collection(collection)
        reference = CollectionSpec(
            base_model_name_or_path=bases_config.base_model_name_or_path,
            module_shapes={k: (m.in_features, m.out_features) for k, m in bases_config.modules.items()},
            target_modules=bases_config.target_modules,
            task_type=report.data.get("task_type"),
        )
        spec = check_collection(loras, reference)
        taken = sorted({a.name for a in loras} & set(report.adapters))
        if taken and not overwrite:
            raise DestinationError(f"adapters {taken} already exist in {collection}; rename them (NAME=SOURCE) or "
                                   "pass overwrite=True / --overwrite.")
        stray = sorted(set(stray_adapters(collection, report)) - {a.name for a in loras})
        if stray:
            logger.warning("%s/%s holds adapter folders its report does not list (%s), left by an interrupted write; "
                           "they are kept as they are.", collection, adapters_dir(collection).name, ", ".join(stray))
        module_keys = sorted(spec.module_shapes, key=natural_key)
        diagonal = bases_config.sigma_type == "diag"
        calibrated = "calibration" in report.data["settings"]
        sigmas, clusters, errors2 = _project(collection, loras, module_keys, diagonal, progress, not calibrated)
        target_modules = _existing_target_modules(collection) or jd_target_modules(loras, spec)
        sigma_params = sum(sigma_values(bases_config.rank_of(key), bases_config.sigma_type) for key in module_keys)
        for adapter in loras:
            entry = adapter_entry(adapter.source, errors2[adapter.name], clusters[adapter.name],
                                  adapter.lora_params(), sigma_params, added=True,
                                  saved_params=adapter.saved_params())
            report.adapters[adapter.name] = entry
            if entry["mean_err2"] > warn_error:
                message = (
                    f"adapter {adapter.name!r}: mean err² {entry['mean_err2']:.3f} on the existing bases exceeds "
                    f"{warn_error} (collection mean {report.mean_err2:.3f}); the bases do not represent it well. "
                    "Re-compressing the collection with this adapter included is advised."
                )
                warnings.warn(message, UserWarning, stacklevel=2)
                report.warnings.append(message)
        bases_params = sum(bases_values(bases_config.rank_of(key), m.num_clusters, m.in_features, m.out_features)
                           for key, m in bases_config.modules.items())
        report.refresh(bases_params, sigma_params / max(1, len(module_keys)))
        report.timings.setdefault("add_s", []).append(time.perf_counter() - start)
        # The collection is checked above, so it is replaced even without a marker (written before markers existed).
        with atomic_directory(collection, overwrite=True, kind=KIND_COLLECTION) as tmp:
            link_tree(collection, tmp)
            for adapter in loras:
                write_collection_adapter(tmp, adapter, sigmas.pop(adapter.name), clusters[adapter.name], bases_config,
                                         target_modules, spec.task_type,
                                         collection_adapter_card(adapter.name, report),
                                         sigma_dtype=STORAGE_DTYPES[report.data["settings"].get("sigma_dtype",
                                                                                                "float32")])
            report.save(report_path(tmp))
    report.path = report_path(collection)
    return report


def _project(collection: Path, loras: list[LoraAdapter], module_keys: list[str], diagonal: bool, progress: bool,
             orthonormal: bool = True
             ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, int]], dict[str, dict[str, float]]]:
    """Per new adapter and module: its Σ, cluster and err² on the collection's bases (plain Frobenius error: a
    calibrated collection does not keep its calibration statistics, and its V is not orthonormal)."""
    sigmas: dict[str, dict[str, torch.Tensor]] = {a.name: {} for a in loras}
    clusters: dict[str, dict[str, int]] = {a.name: {} for a in loras}
    errors2: dict[str, dict[str, float]] = {a.name: {} for a in loras}
    with safe_open(bases_dir(collection) / BASES_WEIGHTS_NAME, framework="pt") as handle:
        for module_key in tqdm(module_keys, desc="project", unit="module", disable=not progress):
            U = handle.get_tensor(f"{module_key}.U").float()
            V = handle.get_tensor(f"{module_key}.V").float()
            cluster, sigma, err2 = project_stack(read_module_stack(loras, module_key), U, V, diagonal, orthonormal)
            for i, adapter in enumerate(loras):
                sigmas[adapter.name][module_key] = sigma[i].clone()
                clusters[adapter.name][module_key] = int(cluster[i])
                errors2[adapter.name][module_key] = float(err2[i])
    return sigmas, clusters, errors2


def _read_collection(collection: Path) -> tuple[BasesConfig, CompressionReport]:
    """The bases config (checked against its weights) and the report of a collection `add` may extend."""
    if not is_collection_root(collection):
        raise DestinationError(
            f"{collection} is not a peft-jd collection (no {bases_dir(collection).name}/{BASES_CONFIG_NAME} and "
            f"{adapters_dir(collection).name}/); point `add` to the output folder of `peft-jd compress`."
        )
    bases_config = BasesConfig.from_file(bases_dir(collection) / BASES_CONFIG_NAME)
    if bases_config.method == "svd":
        raise DestinationError(
            f"{collection} was compressed with method 'svd' (one basis per adapter); there are no shared bases to "
            "project onto. Re-run `peft-jd compress` with the new adapters included."
        )
    weights_path = bases_dir(collection) / BASES_WEIGHTS_NAME
    if not weights_path.is_file():
        raise AdapterFormatError(f"{weights_path} is missing; the collection is incomplete. Re-run compress.")
    if bases_config.fingerprint and file_sha256(weights_path) != bases_config.fingerprint:
        raise BasesMismatchError(f"{weights_path} does not match the fingerprint in its config; it was modified.")
    return bases_config, CompressionReport.load(collection)


def bases_tensor(collection: str | os.PathLike, module_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(U, V)` of one module of a collection's bases (for inspection and tests)."""
    with safe_open(bases_dir(collection) / BASES_WEIGHTS_NAME, framework="pt") as handle:
        return handle.get_tensor(f"{module_key}.U"), handle.get_tensor(f"{module_key}.V")
