"""`--target-error`: choose the rank (then the cluster count) from a probe of modules before compressing everything."""

from __future__ import annotations

import logging
from typing import Any

from tqdm.auto import tqdm

from ..core import UsageError
from .algorithms import compress_stack, module_generator
from .lora_io import LoraAdapter
from .stack import CanonicalStack, read_module_stack


logger = logging.getLogger(__name__)
RANK_CANDIDATES = (4, 8, 16, 32, 64, 128, 256)
CLUSTER_CANDIDATES = (1, 2, 4, 8, 16, 25, 32, 64)


def probe_module_keys(module_keys: list[str], count: int) -> list[str]:
    """Up to `count` modules spread over the target types and depth (the middle layer of each type first)."""
    by_type: dict[str, list[str]] = {}
    for key in module_keys:
        by_type.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    ordered = []
    for depth in (0.5, 0.25, 0.75, 0.0, 1.0):
        for keys in by_type.values():
            candidate = keys[min(len(keys) - 1, int(depth * len(keys)))]
            if candidate not in ordered:
                ordered.append(candidate)
    return ordered[: max(1, count)]


def _mean_error(stacks: dict[str, CanonicalStack], method: str, rank: int, clusters: int, settings: dict[str, Any]
                ) -> float:
    errors = []
    for module_key, stack in stacks.items():
        result = compress_stack(stack, method, rank, clusters, normalize=settings["normalize"], tol=settings["tol"],
                                max_iter=settings["max_iter"], max_rounds=settings["max_rounds"],
                                generator=module_generator(settings["seed"], module_key))
        errors.append(float(result.err2.mean()))
    return sum(errors) / len(errors)


def auto_select(
    loras: list[LoraAdapter],
    module_keys: list[str],
    method: str,
    target_error: float,
    rank: int | None = None,
    clusters: int | None = None,
    normalize: bool = True,
    seed: int = 0,
    tol: float = 1e-3,
    max_iter: int = 100,
    max_rounds: int = 3,
    probe_modules: int = 3,
    progress: bool = True,
) -> tuple[int, int, dict[str, Any]]:
    """Smallest rank meeting `target_error` (mean err² over probe modules and adapters), then the fewest clusters.

    For each candidate rank (ascending) the largest cluster count is tried first; if it meets the target, the
    smallest sufficient cluster count is found by bisection (error falls with more clusters). A given `rank` or
    `clusters` is kept fixed.

    Returns:
        `(rank, clusters, selection)` where `selection` records the probe modules, every configuration tried and its
        error, and whether the target was met (if not, the most accurate configuration tried is returned).
    """
    if not 0 < target_error < 1:
        raise UsageError(f"target_error is a squared relative error in (0, 1), got {target_error}.")
    probes = probe_module_keys(module_keys, probe_modules)
    stacks = {key: read_module_stack(loras, key) for key in probes}
    max_rank = min(min(s.d_out, s.d_in) for s in stacks.values())
    ranks = [rank] if rank is not None else [r for r in RANK_CANDIDATES if r <= max_rank] or [max_rank]
    n = len(loras)
    if method == "svd":
        cluster_options = [1]
    elif clusters is not None:
        cluster_options = [clusters]
    else:
        cluster_options = [c for c in CLUSTER_CANDIDATES if c <= max(1, n // 2)]
    settings = {"normalize": normalize, "tol": tol, "max_iter": max_iter, "max_rounds": max_rounds, "seed": seed}
    tried: dict[tuple[int, int], float] = {}
    bar = tqdm(desc=f"auto-select (target err² ≤ {target_error})", unit="config", disable=not progress)

    def error_of(r: int, c: int) -> float:
        if (r, c) not in tried:
            tried[(r, c)] = _mean_error(stacks, method, r, c, settings)
            bar.update(1)
            bar.set_postfix(rank=r, clusters=c, err2=f"{tried[(r, c)]:.3f}")
        return tried[(r, c)]

    choice = None
    for r in ranks:
        if error_of(r, cluster_options[-1]) > target_error:
            continue
        low, high = 0, len(cluster_options) - 1  # invariant: cluster_options[high] meets the target
        while low < high:
            middle = (low + high) // 2
            if error_of(r, cluster_options[middle]) <= target_error:
                high = middle
            else:
                low = middle + 1
        choice = (r, cluster_options[high])
        break
    bar.close()
    met = choice is not None
    if choice is None:
        choice = min(tried, key=tried.get)
        logger.warning("no configuration reaches mean err² ≤ %s on the probe; using the most accurate tried: "
                       "rank %d, %d cluster(s), err² %.4f", target_error, *choice, tried[choice])
    selection = {
        "target_error": target_error,
        "met": met,
        "rank": choice[0],
        "clusters": choice[1],
        "probe_err2": tried[choice],
        "probe_modules": probes,
        "tried": [{"rank": r, "clusters": c, "err2": e} for (r, c), e in tried.items()],
    }
    logger.info("auto-selected rank %d, %d cluster(s) (probe err² %.4f)", choice[0], choice[1], tried[choice])
    return choice[0], choice[1], selection
