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
    KIND_COLLECTION,
    BasesConfig,
    UsageError,
    atomic_directory,
    bases_dir,
    report_path,
    write_bases,
    writer_lock,
)
from .algorithms import check_method, compress_stack, module_generator, normalization_weights, sigma_type_of
from .autoselect import auto_select
from .budgeted import (
    NESTED_NAMES,
    BudgetPlan,
    allocate,
    energy_weights,
    nested_from_tensors,
    nested_tensors,
    plan_budget,
    plan_target,
    refine,
)
from .calibration import DEFAULT_DAMPING, InputStatistics, Whitening
from .cards import bases_card, collection_adapter_card
from .fallback import add_private_clusters, fallback_pairs
from .lora_io import CollectionSpec, HubOptions, LoraAdapter, check_collection, load_loras
from .nested import nest
from .report import CompressionReport, adapter_entry
from .sizes import STORAGE_DTYPES, Budget, bases_values, sigma_values
from .stack import read_module_stack
from .workdir import WorkDir, inputs_fingerprint
from .writer import check_compress_destination, write_collection_adapter


logger = logging.getLogger(__name__)


def natural_key(text: str) -> list[Any]:
    """Sort key putting `layers.2` before `layers.10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def check_rank(rank: int, spec: CollectionSpec) -> None:
    for module_key, (in_features, out_features) in spec.module_shapes.items():
        if rank > min(in_features, out_features):
            raise UsageError(
                f"rank {rank} exceeds module {module_key} ({in_features}→{out_features}); choose a rank ≤ "
                f"{min(min(shape) for shape in spec.module_shapes.values())}."
            )
    if rank <= 0:
        raise UsageError(f"rank must be positive, got {rank}.")


def jd_target_modules(adapters: list[LoraAdapter], spec: CollectionSpec) -> list[str]:
    """`target_modules` of the sigma adapters: the suffixes, or the exact module keys when the LoRAs were restricted
    (layers, excludes, regex), so that PEFT targets exactly the compressed modules."""
    for adapter in adapters:
        config = adapter.config
        if (not isinstance(config.get("target_modules"), (list, tuple)) or config.get("layers_to_transform")
                is not None or config.get("layers_pattern") or config.get("exclude_modules")):
            return sorted(spec.module_shapes, key=natural_key)
    return spec.target_modules


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
    overwrite: bool = False,
    budget: str | float | None = None,
    sigma_dtype: str = "float32",
    rank_allocation: str = "uniform",
    fallback_error: float | None = None,
    calibration: str | os.PathLike | InputStatistics | None = None,
    calibration_damping: float = DEFAULT_DAMPING,
    allocation_weighting: str = "module",
) -> CompressionReport:
    """Compresses a collection of PEFT LoRA adapters into shared bases plus one small sigma adapter each.

    Args:
        adapters: LoRA folders, Hub repo ids (`owner/name[/subfolder][@revision]`, optionally `NAME=` in front) or
            text files listing them.
        out_dir: Output collection folder. It is written as a whole and swapped in atomically, under a lock that
            other `compress`/`add` runs on it wait for. An existing peft-jd collection is replaced; any other
            non-empty folder, or a collection holding adapters added with `add` that are not among `adapters`, is
            refused unless `overwrite=True`.
        method: `"jd-full"` (shared orthonormal U, V, full k×k Σ), `"jd-diag"` (diagonal Σ) or `"svd"` (per-adapter
            truncated SVD, no sharing: the baseline).
        rank: Rank k of the bases (default 16, or chosen by `target_error`). With `budget`, the largest rank a module
            may get (default: 1.5× (full Σ) or 2× (diagonal Σ) the uniform rank that meets the budget).
        clusters: Number of clusters per module (default 1, or chosen by `target_error`); ignored by `svd`.
        target_error: If set, choose the smallest rank (then cluster count) whose mean err² on a probe of modules
            is at most this value; explicit `rank`/`clusters` are kept fixed.
        normalize: Give every adapter the same weight (divide by `‖ΔW_i‖_F`), i.e. minimise the mean relative error.
        seed: Seed of all randomness (results are deterministic for a seed).
        tol: Stop a solve when an iteration lowers the relative error by less than `tol` times itself.
        max_iter: Maximum iterations of a solve.
        max_rounds: Maximum reassignment rounds with clusters.
        bases_dtype: dtype of the stored bases (`float32`, `bfloat16`, `float16`).
        revision: Default Hub revision of Hub adapters.
        token: Hub token.
        cache_dir: Hub cache folder.
        local_files_only: Use only already downloaded Hub files.
        resume: Reuse finished modules of an interrupted identical run.
        progress: Show progress bars.
        probe_modules: Modules used by `target_error`.
        overwrite: Replace `out_dir` whatever it holds (see `out_dir`).
        budget: Memory budget per adapter instead of one rank for all modules: a ratio to the LoRAs (`"16x"`: 1/16
            of their bytes at fp16) or bytes per adapter (`200000`, `"150KB"`), counting Σ, `modules_to_save` and
            the adapter's share of the bases (`bases bytes / n`). The rank of every module is then chosen to
            minimise the mean err² under the budget (see `docs/compression.md`) and recorded in the format.
        sigma_dtype: dtype of the stored Σ (`float32`, `bfloat16`, `float16`).
        rank_allocation: `"uniform"` (one rank for every module) or `"per-module"`: with `target_error`, the ranks
            of the modules are allocated like a budget's, for the fewest bytes whose mean err² over all modules
            meets the target (`budget` always allocates per module).
        fallback_error: Adapters whose err² on a module's shared clusters exceeds this keep their own factors for
            that module, as a private cluster in the same collection (served in the same mixed batches); their bytes
            are counted in the report and, with `budget`, charged to it. Default: off.
        calibration: Input statistics of the base model (a file from `peft-jd calibrate`, or `InputStatistics`):
            the compression then minimises the error on those inputs, `‖(ΔW_i − ΔŴ_i) X‖`, instead of the plain
            Frobenius error, and the reported err² are those activation errors (see `calibration.py`).
        calibration_damping: Ridge added to each input second moment, relative to the mean of its diagonal.
        allocation_weighting: What the per-module allocation minimises: `"module"`, the mean over modules of their
            relative err² (every module weighs the same), or `"energy"`, every adapter's relative err² over all its
            modules (a module weighs by its share of the adapter's update energy, whitened with `calibration`).

    Returns:
        The [`CompressionReport`] (also written to `out_dir/report.json`).
    """
    start = time.perf_counter()
    check_method(method)
    for what, value in (("bases_dtype", bases_dtype), ("sigma_dtype", sigma_dtype)):
        if value not in STORAGE_DTYPES:
            raise UsageError(f"{what} must be one of {sorted(STORAGE_DTYPES)}, got {value!r}.")
    if budget is not None and (target_error is not None or method == "svd"):
        raise UsageError("budget chooses the ranks itself: it cannot be combined with target_error, and the svd "
                         "baseline shares nothing to budget; drop one of them.")
    budget = Budget.parse(budget) if budget is not None else None
    whitening = None
    if calibration is not None:
        statistics = calibration if isinstance(calibration, InputStatistics) else InputStatistics.load(calibration)
        whitening = Whitening(statistics, calibration_damping)
    if fallback_error is not None and not 0 < fallback_error < 1:
        raise UsageError(f"fallback_error is a squared relative error in (0, 1), got {fallback_error}.")
    if allocation_weighting not in ("module", "energy"):
        raise UsageError(f"allocation_weighting must be 'module' or 'energy', got {allocation_weighting!r}.")
    if rank_allocation not in ("uniform", "per-module"):
        raise UsageError(f"rank_allocation must be 'uniform' or 'per-module', got {rank_allocation!r}.")
    if rank_allocation == "per-module" and budget is None and target_error is None:
        raise UsageError("rank_allocation='per-module' needs a budget or a target_error to allocate for.")
    out_dir = Path(os.path.abspath(out_dir))
    hub = HubOptions(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    loras = load_loras(adapters, hub)
    spec = check_collection(loras)
    # The lock covers the whole write: a second writer of `out_dir` waits, so bases and Σ of two runs never mix.
    with writer_lock(out_dir):
        check_compress_destination(out_dir, [a.name for a in loras], overwrite)
        module_keys = sorted(spec.module_shapes, key=natural_key)
        selection = None
        if target_error is not None:
            rank, clusters, selection = auto_select(
                loras, module_keys, method, target_error, rank=rank, clusters=clusters, normalize=normalize,
                seed=seed, tol=tol, max_iter=max_iter, max_rounds=max_rounds, probe_modules=probe_modules,
                progress=progress)
        clusters = 1 if clusters is None or method == "svd" else max(1, int(clusters))
        plan = None
        if budget is not None:
            plan = plan_budget(budget, loras, spec, sigma_type_of(method), clusters, sigma_dtype, bases_dtype,
                               None if rank is None else int(rank))
            rank = max(plan.max_ranks.values())
        elif target_error is not None and rank_allocation == "per-module" and method != "svd":
            plan = plan_target(target_error, rank, loras, spec, sigma_type_of(method), clusters, sigma_dtype,
                               bases_dtype)
            rank = max(plan.max_ranks.values())
        rank = 16 if rank is None else int(rank)
        if plan is None:
            check_rank(rank, spec)
        settings = {"method": method, "rank": rank, "clusters": clusters, "normalize": normalize, "seed": seed,
                    "tol": tol, "max_iter": max_iter, "max_rounds": max_rounds, "bases_dtype": bases_dtype,
                    "sigma_dtype": sigma_dtype, "fallback_error": fallback_error}
        if plan is not None:
            settings.update(plan.settings(), allocation_weighting=allocation_weighting)
        if whitening is not None:
            settings["calibration"] = whitening.settings()
        work = WorkDir(out_dir, {"settings": settings, "inputs": inputs_fingerprint(loras), "modules": module_keys},
                       resume=resume)
        bar = tqdm(module_keys, desc=f"compress ({method}, k={rank}, c={clusters})", unit="module",
                   disable=not progress)
        for index, module_key in enumerate(bar):
            if work.done(index, module_key):
                continue
            t0 = time.perf_counter()
            stack = _module_stack(loras, module_key, whitening)
            t1 = time.perf_counter()
            module_rank = rank if plan is None else min(plan.max_ranks[module_key], stack.n * stack.r)
            result = compress_stack(stack, method, module_rank, clusters, normalize=normalize, tol=tol,
                                    max_iter=max_iter, max_rounds=max_rounds,
                                    generator=module_generator(seed, module_key))
            info = {"seconds_read": t1 - t0, "seconds_compress": result.seconds, "iterations": result.iterations,
                    "rounds": result.rounds, "history": result.history[-50:]}
            if plan is None:
                private = fallback_pairs(result.err2, fallback_error)
                result = add_private_clusters(result, stack, private)
                info["fallback"] = private.tolist()
                work.save(index, module_key, result, info)
            else:
                t2 = time.perf_counter()
                nested = nest(result, stack, method == "jd-diag", normalization_weights(stack, normalize))
                info["seconds_compress"] += time.perf_counter() - t2
                work.save_tensors(index, module_key, {**nested_tensors(nested), "norms2": stack.norms2()}, info)
            del stack
            bar.set_postfix(err2=f"{float(result.err2.mean()):.3f}")
        ranks, private = _allocate(plan, work, module_keys, spec, settings)
        report = _assemble(out_dir, work, loras, spec, module_keys, settings, selection, start, overwrite, ranks,
                           private, whitening)
        work.cleanup()
    logger.info("%s", report.summary())
    return report


def _allocate(plan: BudgetPlan | None, work: WorkDir, module_keys: list[str], spec: CollectionSpec,
              settings: dict[str, Any]) -> tuple[dict[str, int] | None, dict[str, torch.Tensor]]:
    """Budgeted runs: the rank of every module from the error curves of the finished modules, and the adapters that
    fall back to private clusters per module (else `None, {}`)."""
    if plan is None:
        return None, {}
    loaded = {key: work.load(index, key, ("err2", "norms2"))[0] for index, key in enumerate(module_keys)}
    errors = {key: tensors["err2"] for key, tensors in loaded.items()}
    weights = None
    if settings["allocation_weighting"] == "energy":
        weights = energy_weights({key: tensors["norms2"] for key, tensors in loaded.items()})
    allocation, private = allocate(plan, errors, spec.module_shapes, settings["fallback_error"], weights)
    settings["rank"] = max(allocation.ranks.values())
    settings["allocated_bytes_per_adapter"] = round(allocation.bytes_per_adapter, 1)
    return allocation.ranks, private


def _module_stack(loras: list[LoraAdapter], module_key: str, whitening: Whitening | None):
    """The module's updates, whitened by the calibration statistics when there are some."""
    stack = read_module_stack(loras, module_key)
    return stack if whitening is None else whitening.apply(stack, module_key)


def _module_result(work: WorkDir, index: int, module_key: str, ranks: dict[str, int] | None,
                   private: dict[str, torch.Tensor], loras: list[LoraAdapter], whitening: Whitening | None,
                   settings: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A finished module's tensors (`U`, `V`, `sigma`, `cluster`, `err2`); in budgeted runs truncated to its rank,
    refined there, and given its private clusters."""
    if ranks is None:
        return work.load(index, module_key)
    tensors, info = work.load(index, module_key, NESTED_NAMES)
    result = nested_from_tensors(tensors).truncate(ranks[module_key])
    # The updates are read again (the allocation came after the solve): refine at the module's rank, then give the
    # fallback adapters their private clusters.
    stack = _module_stack(loras, module_key, whitening)
    t0 = time.perf_counter()
    result = refine(result, stack, settings["method"], normalization_weights(stack, settings["normalize"]),
                    settings["tol"], settings["max_iter"])
    info["seconds_refine"] = time.perf_counter() - t0
    if module_key in private:
        result = add_private_clusters(result, stack, private[module_key])
        info["fallback"] = private[module_key].tolist()
    return {"U": result.U, "V": result.V, "sigma": result.sigma, "cluster": result.cluster,
            "err2": result.err2}, info


def _assemble(out_dir: Path, work: WorkDir, loras: list[LoraAdapter], spec: CollectionSpec, module_keys: list[str],
              settings: dict[str, Any], selection: dict[str, Any] | None, start: float,
              overwrite: bool, ranks: dict[str, int] | None = None,
              private: dict[str, torch.Tensor] | None = None,
              whitening: Whitening | None = None) -> CompressionReport:
    """Writes `bases/`, every sigma adapter and `report.json` into a temporary folder, swapped in as `out_dir`."""
    t_write = time.perf_counter()
    method, rank = settings["method"], settings["rank"]
    sigma_type = sigma_type_of(method)
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    sigmas: dict[str, dict[str, torch.Tensor]] = {a.name: {} for a in loras}
    clusters: dict[str, dict[str, int]] = {a.name: {} for a in loras}
    errors2: dict[str, dict[str, float]] = {a.name: {} for a in loras}
    modules: dict[str, dict[str, Any]] = {}
    for index, module_key in enumerate(module_keys):
        tensors, info = _module_result(work, index, module_key, ranks, private or {}, loras, whitening, settings)
        info["fallback"] = [loras[i].name for i in info.get("fallback", [])]
        dtype = STORAGE_DTYPES[settings["bases_dtype"]]
        V = tensors["V"] if whitening is None else whitening.restore(tensors["V"], module_key)
        bases[module_key] = (tensors["U"].to(dtype), V.to(dtype))
        cluster, err2 = tensors["cluster"].tolist(), tensors["err2"].tolist()
        for i, adapter in enumerate(loras):
            sigmas[adapter.name][module_key] = tensors["sigma"][i].clone()
            clusters[adapter.name][module_key] = cluster[i]
            errors2[adapter.name][module_key] = err2[i]
        in_features, out_features = spec.module_shapes[module_key]
        modules[module_key] = {"in_features": in_features, "out_features": out_features,
                               "rank": int(tensors["U"].shape[-1]), "num_clusters": int(tensors["U"].shape[0]),
                               "cluster_sizes": torch.bincount(tensors["cluster"]).tolist(),
                               "mean_err2": sum(err2) / len(err2), **info}
    sigma_params = sum(sigma_values(U.shape[-1], sigma_type) for U, _ in bases.values())
    bases_params = sum(bases_values(U.shape[-1], U.shape[0], V.shape[1], U.shape[1]) for U, V in bases.values())
    sigma_size = sigma_params / max(1, len(bases))
    entries = {
        a.name: adapter_entry(a.source, errors2[a.name], clusters[a.name], a.lora_params(), sigma_params,
                              saved_params=a.saved_params())
        for a in loras
    }
    report = CompressionReport.build(settings, spec.base_model_name_or_path, spec.target_modules, spec.task_type,
                                     modules, entries, bases_params, sigma_size, selection)
    metadata = {"settings": settings, "num_adapters": len(loras), "auto_selection": selection,
                "seconds": time.perf_counter() - start}
    bases_config = BasesConfig(r=rank, sigma_type=sigma_type, num_clusters=1,
                               base_model_name_or_path=spec.base_model_name_or_path,
                               target_modules=spec.target_modules, modules={}, method=method, metadata=metadata)
    target_modules = jd_target_modules(loras, spec)
    with atomic_directory(out_dir, overwrite=overwrite, kind=KIND_COLLECTION) as tmp:
        bases_config = write_bases(bases_dir(tmp), bases, bases_config, readme=bases_card(report))
        del bases
        for adapter in loras:
            write_collection_adapter(tmp, adapter, sigmas.pop(adapter.name), clusters[adapter.name], bases_config,
                                     target_modules, spec.task_type, collection_adapter_card(adapter.name, report),
                                     sigma_dtype=STORAGE_DTYPES[settings["sigma_dtype"]])
        report.timings.update({
            "total_s": time.perf_counter() - start,
            "read_s": sum(m["seconds_read"] for m in modules.values()),
            "compress_s": sum(m["seconds_compress"] for m in modules.values()),
            "write_s": time.perf_counter() - t_write,
        })
        report.data["bases_fingerprint"] = bases_config.fingerprint
        report.save(report_path(tmp))
    report.path = report_path(out_dir)
    return report
