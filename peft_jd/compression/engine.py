"""`compress(...)`: LoRA adapters in, a JD-LoRA collection (`bases/`, `adapters/<name>/`, `report.json`) out.

The run streams module by module: read that module's factors from every adapter file, compress, store the result in
the resumable work folder; the output folder is assembled atomically at the end.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core import (
    BASES_CONFIG_NAME,
    BasesConfig,
    atomic_directory,
    write_bases,
    write_sigma_adapter,
)
from ..tuner.config import JDLoraConfig
from .algorithms import check_method, compress_stack, module_generator, sigma_type_of
from .autoselect import auto_select
from .lora_io import CollectionSpec, HubOptions, LoraAdapter, check_collection, load_loras
from .report import (
    ERROR_CONVENTION,
    REPORT_FORMAT,
    REPORT_NAME,
    CompressionReport,
    adapter_entry,
    summarize,
)
from .stack import read_module_stack
from .workdir import WorkDir, inputs_fingerprint


logger = logging.getLogger(__name__)
BASES_DIR, ADAPTERS_DIR = "bases", "adapters"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def natural_key(text: str) -> list[Any]:
    """Sort key putting `layers.2` before `layers.10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def check_rank(rank: int, spec: CollectionSpec) -> None:
    for module_key, (in_features, out_features) in spec.module_shapes.items():
        if rank > min(in_features, out_features):
            raise ValueError(
                f"rank {rank} exceeds module {module_key} ({in_features}→{out_features}); choose a rank ≤ "
                f"{min(min(shape) for shape in spec.module_shapes.values())}."
            )
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}.")


def _check_out_dir(out_dir: Path) -> None:
    """Refuses to replace a non-empty folder that is not a peft-jd collection (it would be deleted)."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not ((out_dir / REPORT_NAME).is_file() or (out_dir / BASES_DIR / BASES_CONFIG_NAME).is_file()):
            raise FileExistsError(
                f"{out_dir} exists and is not a peft-jd collection; choose an empty or new output folder."
            )


def jd_target_modules(adapters: list[LoraAdapter], spec: CollectionSpec) -> list[str]:
    """`target_modules` of the sigma adapters: the suffixes, or the exact module keys when the LoRAs were restricted
    (layers, excludes, regex), so that PEFT targets exactly the compressed modules."""
    for adapter in adapters:
        config = adapter.config
        if (not isinstance(config.get("target_modules"), (list, tuple)) or config.get("layers_to_transform")
                is not None or config.get("layers_pattern") or config.get("exclude_modules")):
            return sorted(spec.module_shapes, key=natural_key)
    return spec.target_modules


def _model_card(title: str, lines: list[str]) -> str:
    return "\n".join(["---", "library_name: peft", "tags:", "- peft-jd", "- jd-lora", "---", "", f"# {title}", "",
                      *lines, ""])


def compress(
    adapters: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    method: str = "jd-full",
    rank: int | None = None,
    clusters: int | None = None,
    target_error: float | None = None,
    normalize: bool = True,
    seed: int = 0,
    tol: float = 1e-3,
    max_iter: int = 100,
    max_rounds: int = 3,
    bases_dtype: str = "float32",
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    resume: bool = True,
    progress: bool = True,
    probe_modules: int = 3,
) -> CompressionReport:
    """Compresses a collection of PEFT LoRA adapters into shared bases plus one small sigma adapter each.

    Args:
        adapters: LoRA folders, Hub repo ids (`owner/name[/subfolder][@revision]`, optionally `NAME=` in front) or
            text files listing them.
        out_dir: Output collection folder (written atomically; a non-collection folder is never replaced).
        method: `"jd-full"` (shared orthonormal U, V, full k×k Σ), `"jd-diag"` (diagonal Σ) or `"svd"` (per-adapter
            truncated SVD, no sharing: the baseline).
        rank: Rank k of the bases (default 16, or chosen by `target_error`).
        clusters: Number of clusters per module (default 1, or chosen by `target_error`); ignored by `svd`.
        target_error: If set, choose the smallest rank (then cluster count) whose mean err² on a probe of modules
            is at most this value; explicit `rank`/`clusters` are kept fixed.
        normalize: Give every adapter the same weight (divide by `‖ΔW_i‖_F`), i.e. minimise the mean relative error.
        seed: Seed of all randomness (results are deterministic for a seed).
        tol: Stop a solve when an iteration lowers the relative error by less than `tol` times itself.
        max_iter: Maximum iterations of a solve.
        max_rounds: Maximum reassignment rounds with clusters.
        bases_dtype: dtype of the stored bases (`float32`, `bfloat16`, `float16`); Σ is always fp32.
        revision: Default Hub revision of Hub adapters.
        token: Hub token.
        cache_dir: Hub cache folder.
        local_files_only: Use only already downloaded Hub files.
        resume: Reuse finished modules of an interrupted identical run.
        progress: Show progress bars.
        probe_modules: Modules used by `target_error`.

    Returns:
        The [`CompressionReport`] (also written to `out_dir/report.json`).
    """
    start = time.perf_counter()
    check_method(method)
    if bases_dtype not in _DTYPES:
        raise ValueError(f"bases_dtype must be one of {sorted(_DTYPES)}, got {bases_dtype!r}.")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    hub = HubOptions(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    loras = load_loras(adapters, hub)
    spec = check_collection(loras)
    module_keys = sorted(spec.module_shapes, key=natural_key)
    selection = None
    if target_error is not None:
        rank, clusters, selection = auto_select(
            loras, module_keys, method, target_error, rank=rank, clusters=clusters, normalize=normalize, seed=seed,
            tol=tol, max_iter=max_iter, max_rounds=max_rounds, probe_modules=probe_modules, progress=progress)
    rank = 16 if rank is None else int(rank)
    clusters = 1 if clusters is None or method == "svd" else max(1, int(clusters))
    check_rank(rank, spec)
    settings = {"method": method, "rank": rank, "clusters": clusters, "normalize": normalize, "seed": seed,
                "tol": tol, "max_iter": max_iter, "max_rounds": max_rounds, "bases_dtype": bases_dtype}
    work = WorkDir(out_dir, {"settings": settings, "inputs": inputs_fingerprint(loras), "modules": module_keys},
                   resume=resume)
    bar = tqdm(module_keys, desc=f"compress ({method}, k={rank}, c={clusters})", unit="module", disable=not progress)
    for index, module_key in enumerate(bar):
        if work.done(index, module_key):
            continue
        t0 = time.perf_counter()
        stack = read_module_stack(loras, module_key)
        t1 = time.perf_counter()
        result = compress_stack(stack, method, rank, clusters, normalize=normalize, tol=tol, max_iter=max_iter,
                                max_rounds=max_rounds, generator=module_generator(seed, module_key))
        del stack
        info = {"seconds_read": t1 - t0, "seconds_compress": result.seconds, "iterations": result.iterations,
                "rounds": result.rounds, "history": result.history[-50:]}
        work.save(index, module_key, result, info)
        bar.set_postfix(err2=f"{float(result.err2.mean()):.3f}")
    report = _assemble(out_dir, work, loras, spec, module_keys, settings, selection, start)
    work.cleanup()
    logger.info("%s", report.summary())
    return report


def _assemble(out_dir: Path, work: WorkDir, loras: list[LoraAdapter], spec: CollectionSpec, module_keys: list[str],
              settings: dict[str, Any], selection: dict[str, Any] | None, start: float) -> CompressionReport:
    """Writes `bases/`, every sigma adapter and `report.json` into a temporary folder, then renames it to `out_dir`."""
    t_write = time.perf_counter()
    method, rank = settings["method"], settings["rank"]
    sigma_type = sigma_type_of(method)
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    sigmas: dict[str, dict[str, torch.Tensor]] = {a.name: {} for a in loras}
    clusters: dict[str, dict[str, int]] = {a.name: {} for a in loras}
    errors2: dict[str, dict[str, float]] = {a.name: {} for a in loras}
    modules: dict[str, dict[str, Any]] = {}
    for index, module_key in enumerate(module_keys):
        tensors, info = work.load(index, module_key)
        dtype = _DTYPES[settings["bases_dtype"]]
        bases[module_key] = (tensors["U"].to(dtype), tensors["V"].to(dtype))
        cluster, err2 = tensors["cluster"].tolist(), tensors["err2"].tolist()
        for i, adapter in enumerate(loras):
            sigmas[adapter.name][module_key] = tensors["sigma"][i].clone()
            clusters[adapter.name][module_key] = cluster[i]
            errors2[adapter.name][module_key] = err2[i]
        in_features, out_features = spec.module_shapes[module_key]
        modules[module_key] = {"in_features": in_features, "out_features": out_features,
                               "num_clusters": int(tensors["U"].shape[0]),
                               "cluster_sizes": torch.bincount(tensors["cluster"]).tolist(),
                               "mean_err2": sum(err2) / len(err2), **info}
    sigma_size = rank * rank if sigma_type == "full" else rank
    bases_params = sum(U.shape[0] * rank * (U.shape[1] + V.shape[1]) for U, V in bases.values())
    metadata = {"settings": settings, "num_adapters": len(loras), "auto_selection": selection,
                "seconds": time.perf_counter() - start}
    bases_config = BasesConfig(r=rank, sigma_type=sigma_type, num_clusters=1,
                               base_model_name_or_path=spec.base_model_name_or_path,
                               target_modules=spec.target_modules, modules={}, method=method, metadata=metadata)
    out_dir = out_dir.absolute()
    target_modules = jd_target_modules(loras, spec)
    with atomic_directory(out_dir) as tmp:
        bases_config = write_bases(tmp / BASES_DIR, bases, bases_config, readme=_bases_card(settings, spec, loras))
        del bases
        entries = {}
        for adapter in loras:
            per_module = clusters[adapter.name]
            cluster_ids = set(per_module.values())
            config = JDLoraConfig(
                r=rank, sigma_type=sigma_type, target_modules=target_modules, bases=f"../../{BASES_DIR}",
                bases_fingerprint=bases_config.fingerprint,
                cluster=next(iter(cluster_ids)) if len(cluster_ids) == 1 else dict(per_module),
                base_model_name_or_path=spec.base_model_name_or_path, task_type=spec.task_type, inference_mode=True,
            )
            entry = adapter_entry(adapter.source, errors2[adapter.name], per_module, adapter.lora_params(),
                                  sigma_size * len(module_keys))
            write_sigma_adapter(tmp / ADAPTERS_DIR / adapter.name, sigmas.pop(adapter.name), config,
                                    adapter_card(adapter.source, method, rank, entry))
            entries[adapter.name] = entry
        report = CompressionReport(data=_report_data(settings, spec, modules, entries, bases_params, sigma_size,
                                                     selection))
        report.data["timings"] = {
            "total_s": time.perf_counter() - start,
            "read_s": sum(m["seconds_read"] for m in modules.values()),
            "compress_s": sum(m["seconds_compress"] for m in modules.values()),
            "write_s": time.perf_counter() - t_write,
        }
        report.data["bases_fingerprint"] = bases_config.fingerprint
        report.save(tmp / REPORT_NAME)
    report.path = out_dir / REPORT_NAME
    return report




def adapter_card(source: str, method: str, rank: int, entry: dict[str, Any]) -> str:
    return _model_card("JD-LoRA sigma adapter", [
        f"Compressed by `peft-jd compress` ({method}, rank {rank}) from the LoRA `{source}`.",
        f"Mean relative reconstruction error (‖ΔW−ΔŴ‖/‖ΔW‖)² over modules: {entry['mean_err2']:.4g}.",
        "Load with `import peft_jd; PeftModel.from_pretrained(base_model, this_folder)`; the shared bases are in "
        "`../../bases`.",
    ])


def _bases_card(settings: dict[str, Any], spec: CollectionSpec, loras: list[LoraAdapter]) -> str:
    return _model_card("JD-LoRA shared bases", [
        f"Shared bases of {len(loras)} LoRA adapters of `{spec.base_model_name_or_path}` compressed with "
        f"`peft-jd compress` ({settings['method']}, rank {settings['rank']}, {settings['clusters']} cluster(s) per "
        f"module, normalisation {'on' if settings['normalize'] else 'off'}, seed {settings['seed']}).",
        f"Target modules: {', '.join(spec.target_modules)}. Sigma adapters are in `../adapters/`; see `report.json`.",
    ])


def _report_data(settings: dict[str, Any], spec: CollectionSpec, modules: dict[str, dict[str, Any]],
                 entries: dict[str, dict[str, Any]], bases_params: int, sigma_size: int,
                 selection: dict[str, Any] | None) -> dict[str, Any]:
    lora_params = sum(entry["lora_params"] for entry in entries.values())
    sigma_params = sum(entry["sigma_params"] for entry in entries.values())
    return {
        "format": REPORT_FORMAT,
        "format_version": 1,
        "error_convention": ERROR_CONVENTION,
        "settings": settings,
        "base_model_name_or_path": spec.base_model_name_or_path,
        "target_modules": spec.target_modules,
        "task_type": spec.task_type,
        "num_adapters": len(entries),
        "num_modules": len(modules),
        "auto_selection": selection,
        "summary": summarize(entries),
        "sizes": sizes_entry(lora_params, bases_params, sigma_params, sigma_size),
        "modules": modules,
        "adapters": entries,
        "warnings": [],
    }


def sizes_entry(lora_params: int, bases_params: int, sigma_params: int, sigma_size: int) -> dict[str, Any]:
    return {
        "lora_params": lora_params,
        "bases_params": bases_params,
        "sigma_params": sigma_params,
        "sigma_params_per_module": sigma_size,
        "compression_ratio": lora_params / max(1, bases_params + sigma_params),
    }
