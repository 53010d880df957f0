"""Rank per module under a memory budget: greedy allocation by error reduction per stored byte.

Every module starts at rank 1; repeatedly, the module whose next step up (to any higher rank that still fits)
removes the most mean error per extra byte gets it, until no step fits or helps. Steps may skip ranks, so a module
whose error falls only after a few components is not starved by a flat first step. For error curves that are convex
in cost (diminishing returns, the usual case) this greedy choice is optimal — `tests/test_compression_budget.py` checks
it against exhaustive search.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..core import UsageError


__all__ = ["Allocation", "allocate_ranks"]


@dataclass
class Allocation:
    """The outcome of `allocate_ranks`.

    Args:
        ranks: Module key → rank.
        bytes_per_adapter: Bytes per adapter of the allocation.
        mean_err2: Mean over modules of the module's mean err² at its rank (the objective).
    """

    ranks: dict[str, int]
    bytes_per_adapter: float
    mean_err2: float


def _best_step(errors: np.ndarray, costs: np.ndarray, rank: int, room: float) -> tuple[float, int] | None:
    """Best (error reduction per byte, new rank) from `rank` within `room` extra bytes, or None."""
    index = rank - 1
    extra = costs[index + 1 :] - costs[index]
    gain = errors[index] - errors[index + 1 :]
    fits = (extra <= room) & (gain > 0)
    if not fits.any():
        return None
    ratio = np.where(fits, gain / np.maximum(extra, 1e-300), -np.inf)
    best = int(ratio.argmax())
    return float(ratio[best]), rank + 1 + best


def allocate_ranks(
    errors: Mapping[str, Sequence[float]],
    costs: Mapping[str, Sequence[float]],
    budget_bytes: float | None = None,
    target_err2: float | None = None,
) -> Allocation:
    """Chooses a rank per module.

    Args:
        errors: Module key → mean err² at ranks 1, 2, …, K_m (non-increasing up to noise).
        costs: Module key → bytes per adapter at ranks 1, 2, …, K_m (increasing).
        budget_bytes: Stop when no step fits in this many bytes per adapter.
        target_err2: Stop as soon as the mean over modules of the err² is at most this (the fewest bytes the greedy
            order finds for it); at least one of the two limits is needed.
    """
    if budget_bytes is None and target_err2 is None:
        raise ValueError("allocate_ranks needs budget_bytes or target_err2.")
    curves = {key: np.asarray(errors[key], dtype=np.float64) for key in errors}
    prices = {key: np.asarray(costs[key], dtype=np.float64) for key in errors}
    ranks = dict.fromkeys(curves, 1)
    spent = sum(float(prices[key][0]) for key in curves)
    if budget_bytes is not None and spent > budget_bytes:
        raise UsageError(
            f"a budget of {budget_bytes:,.0f} bytes per adapter is below the smallest collection (rank 1 everywhere: "
            f"{spent:,.0f} bytes per adapter); give a larger budget or compress more adapters together."
        )
    total = sum(float(curve[0]) for curve in curves.values())
    limit = float("inf") if budget_bytes is None else budget_bytes
    heap = []
    for key in curves:
        step = _best_step(curves[key], prices[key], 1, limit - spent)
        if step is not None:
            heapq.heappush(heap, (-step[0], key, step[1]))
    while heap and (target_err2 is None or total / len(curves) > target_err2):
        _, key, new_rank = heapq.heappop(heap)
        rank = ranks[key]
        extra = float(prices[key][new_rank - 1] - prices[key][rank - 1])
        if extra > limit - spent:  # the room shrank since this step was queued: look again
            step = _best_step(curves[key], prices[key], rank, limit - spent)
            if step is not None:
                heapq.heappush(heap, (-step[0], key, step[1]))
            continue
        total -= float(curves[key][rank - 1] - curves[key][new_rank - 1])
        spent += extra
        ranks[key] = new_rank
        step = _best_step(curves[key], prices[key], new_rank, limit - spent)
        if step is not None:
            heapq.heappush(heap, (-step[0], key, step[1]))
    mean = sum(float(curves[key][rank - 1]) for key, rank in ranks.items()) / max(1, len(curves))
    return Allocation(ranks=ranks, bytes_per_adapter=spent, mean_err2=mean)
