"""`compress(budget=…)`: ranks allocated per module under a memory budget per adapter (or, with
`rank_allocation="per-module"` and `target_error`, the fewest bytes that meet an error target).

Three steps, all inside `compress`'s resumable module loop:

1. `plan_budget` (or `plan_target`): the budget in bytes per adapter, the uniform rank that meets it (or the uniform
   rank `--target-error`'s probe chose), and the largest rank a module may get (`rank`, or `MAX_RANK_FACTOR` × the
   uniform rank);
2. per module, one solve at that largest rank, reordered into nested components (`nested.nest`) whose error is known
   for every smaller rank;
3. `allocate_ranks` picks the rank of every module from those error curves and the cost model (`sizes`), and each
   module is truncated to its rank when the collection is written, then refined (`refine`): a few more iterations
   of the solver at that rank, started from the truncation, with the clusters kept — a truncated solution is a good
   start but not a rank-k optimum.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..core import UsageError
from .algorithms import relative_errors
from .allocation import Allocation, allocate_ranks
from .jd_diag import jd_diag
from .jd_full import jd_full
from .lora_io import CollectionSpec, LoraAdapter
from .nested import NestedModule
from .result import CompressionResult
from .sizes import REFERENCE_BYTES, Budget, StorageCost
from .stack import CanonicalStack
from .threads import few_threads


logger = logging.getLogger(__name__)

# Largest rank a module may get, as a multiple of the uniform rank meeting the budget: a full-Σ module at 1.5× the
# uniform rank costs 2.25× its share, a diagonal one 1.5×. Larger caps rarely win and cost solve time (with 2× for
# diagonal Σ, compress took 2.3× the uniform time on the zoo LoRAs, against 1.5–1.9× now).
MAX_RANK_FACTOR = {"full": 1.5, "diag": 1.5}
NESTED_NAMES = ("U", "V", "sigma", "cluster", "err2", "projections")


@dataclass
class BudgetPlan:
    """What a budgeted run needs before the module loop.

    Args:
        budget: The budget as given (`None` for an error target).
        bytes_per_adapter: The budget in bytes per adapter available to Σ and bases (modules_to_save excluded), or
            `None` for an error target.
        lora_bytes_per_adapter: Mean bytes of one input LoRA at fp16 (factors only).
        uniform_rank: Largest rank that fits the budget when every module has it.
        max_ranks: Module key → the rank its solve runs at (the largest it may get).
        cost: The cost model.
        clusters: Clusters per module.
        target_err2: The error target (mean over modules and adapters), when allocating for one.
    """

    budget: Budget | None
    bytes_per_adapter: float | None
    lora_bytes_per_adapter: float
    uniform_rank: int
    max_ranks: dict[str, int]
    cost: StorageCost
    clusters: int
    target_err2: float | None = None

    def module_costs(self, module_key: str, shapes: tuple[int, int]) -> list[float]:
        """Bytes per adapter of `module_key` at ranks 1..K."""
        in_features, out_features = shapes
        return [self.cost.module_bytes(k, self.clusters, in_features, out_features)
                for k in range(1, self.max_ranks[module_key] + 1)]

    def settings(self) -> dict[str, Any]:
        settings = {"rank_allocation": "per-module", "lora_bytes_per_adapter": round(self.lora_bytes_per_adapter, 1),
                    "uniform_rank": self.uniform_rank}
        if self.budget is not None:
            settings.update(budget=self.budget.describe(), budget_bytes_per_adapter=round(self.bytes_per_adapter, 1))
        return settings


def _max_ranks(spec: CollectionSpec, sigma_type: str, uniform: int, max_rank: int | None) -> dict[str, int]:
    largest = max_rank or max(uniform + 1, math.ceil(MAX_RANK_FACTOR[sigma_type] * uniform))
    return {key: max(1, min(largest, min(shape))) for key, shape in spec.module_shapes.items()}


def _lora_bytes(loras: list[LoraAdapter]) -> float:
    return REFERENCE_BYTES * sum(a.lora_params() for a in loras) / len(loras)


def plan_target(target_err2: float, uniform_rank: int, loras: list[LoraAdapter], spec: CollectionSpec,
                sigma_type: str, clusters: int, sigma_dtype: str, bases_dtype: str) -> BudgetPlan:
    """Per-module ranks for an error target: modules solved up to `MAX_RANK_FACTOR` × the uniform rank that met the
    target on the probe modules, then the cheapest allocation meeting it."""
    cost = StorageCost(sigma_type, len(loras), sigma_dtype, bases_dtype)
    return BudgetPlan(None, None, _lora_bytes(loras), uniform_rank,
                      _max_ranks(spec, sigma_type, uniform_rank, None), cost, clusters, target_err2)


def plan_budget(budget: Budget, loras: list[LoraAdapter], spec: CollectionSpec, sigma_type: str, clusters: int,
                sigma_dtype: str, bases_dtype: str, max_rank: int | None) -> BudgetPlan:
    """Resolves the budget and the largest rank of every module (see the module docstring)."""
    n = len(loras)
    lora_bytes = _lora_bytes(loras)
    saved_bytes = REFERENCE_BYTES * sum(a.saved_params() for a in loras) / n
    available = budget.resolve(lora_bytes) - saved_bytes
    cost = StorageCost(sigma_type, n, sigma_dtype, bases_dtype)

    def total(rank: int) -> float:
        return sum(cost.module_bytes(min(rank, min(shape)), clusters, *shape) for shape in spec.module_shapes.values())

    if total(1) > available:
        raise UsageError(
            f"budget {budget.describe()} ({available:,.0f} bytes per adapter for Σ and bases) is below the smallest "
            f"collection of these {n} adapters (rank 1 everywhere: {total(1):,.0f} bytes); give a larger budget, "
            "store Σ/bases in float16, or compress more adapters together."
        )
    cap = max(min(shape) for shape in spec.module_shapes.values())
    uniform = 1
    while uniform < cap and total(uniform + 1) <= available:
        uniform += 1
    max_ranks = _max_ranks(spec, sigma_type, uniform, max_rank)
    logger.info("budget %s: %.0f bytes per adapter; uniform rank %d; modules solved at rank ≤ %d",
                budget.describe(), available, uniform, max(max_ranks.values()))
    return BudgetPlan(budget, available, lora_bytes, uniform, max_ranks, cost, clusters)


def nested_tensors(nested: NestedModule) -> dict[str, torch.Tensor]:
    """The work-folder tensors of a nested module."""
    tensors = {"U": nested.U, "V": nested.V, "sigma": nested.sigma, "cluster": nested.cluster.long(),
               "err2": nested.err2}
    if nested.projections is not None:
        tensors["projections"] = nested.projections
    return tensors


def nested_from_tensors(tensors: dict[str, torch.Tensor]) -> NestedModule:
    return NestedModule(U=tensors["U"], V=tensors["V"], sigma=tensors["sigma"], cluster=tensors["cluster"],
                        err2=tensors["err2"], projections=tensors.get("projections"))


def energy_weights(norms2: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module → `(n,)` weights for `allocate` from every module's `‖ΔW_i‖²`: each module's share of each adapter's
    total update energy, scaled so that equal shares weigh 1 (the mean over modules then is the adapter's relative
    error over all its modules)."""
    keys = list(norms2)
    energy = torch.stack([norms2[key] for key in keys])
    shares = energy / energy.sum(0).clamp_min(1e-300) * len(keys)
    return {key: shares[index] for index, key in enumerate(keys)}


def allocate(plan: BudgetPlan, errors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
             fallback_error: float | None = None, weights: dict[str, torch.Tensor] | None = None
             ) -> tuple[Allocation, dict[str, torch.Tensor]]:
    """Ranks per module from every module's per-adapter err² curves `(n, K)`, and the fallback adapters per module.

    `weights` (module → `(n,)`) weigh each adapter's err² in the module's curve (default: all 1).

    With `fallback_error`, the adapters above it at a first allocation's ranks keep their own factors in a private
    cluster (`fallback.py`); the allocation is then redone with their private clusters' bytes charged (they grow
    with the module's rank) and their error taken as served by the private cluster.
    """
    weights = weights or {}

    def curve(key: str, err2: torch.Tensor) -> torch.Tensor:
        return (err2 * weights[key].to(err2.dtype)[:, None]).mean(0) if key in weights else err2.mean(0)

    allocation = _allocate_curves(plan, {key: curve(key, err2) for key, err2 in errors.items()}, shapes, {})
    if fallback_error is None:
        return allocation, {}
    private = {key: (err2[:, allocation.ranks[key] - 1] > fallback_error).nonzero().squeeze(1)
               for key, err2 in errors.items()}
    private = {key: idx for key, idx in private.items() if idx.numel()}
    curves = {}
    for key, err2 in errors.items():
        served = err2.clone()
        if key in private:
            served[private[key]] = 0.0
        curves[key] = curve(key, served)
    return _allocate_curves(plan, curves, shapes, private), private


def _allocate_curves(plan: BudgetPlan, curves: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                     private: dict[str, torch.Tensor]) -> Allocation:
    costs = {}
    for key in curves:
        in_features, out_features = shapes[key]
        extra = [plan.cost.module_bytes(k, len(private.get(key, ())), in_features, out_features)
                 - plan.cost.module_bytes(k, 0, in_features, out_features)
                 for k in range(1, plan.max_ranks[key] + 1)]
        costs[key] = [a + b for a, b in zip(plan.module_costs(key, shapes[key]), extra)]
    allocation = allocate_ranks({key: curve.tolist()[: len(costs[key])] for key, curve in curves.items()},
                                {key: cost[: len(curves[key])] for key, cost in costs.items()},
                                budget_bytes=plan.bytes_per_adapter, target_err2=plan.target_err2)
    logger.info("allocated ranks %d–%d (uniform %d): %.0f bytes per adapter, mean err² %.4f",
                min(allocation.ranks.values()), max(allocation.ranks.values()), plan.uniform_rank,
                allocation.bytes_per_adapter, allocation.mean_err2)
    return allocation


@few_threads()
def refine(result: CompressionResult, stack: CanonicalStack, method: str, weights: torch.Tensor, tol: float,
           max_iter: int) -> CompressionResult:
    """Continues the solver at the truncated rank from the truncated bases (clusters kept); keeps, per cluster,
    whichever of the two has the lower weighted error, so refining never makes a module worse."""
    solver = jd_full if method == "jd-full" else jd_diag
    U, V, sigma = result.U.clone(), result.V.clone(), result.sigma.clone()
    rank = U.shape[-1]
    for c in result.cluster.unique().tolist():
        members = (result.cluster == c).nonzero().squeeze(1)
        sub = stack.select(members)
        if rank > min(sub.d_out, sub.d_in):
            continue
        solution = solver(sub, rank, weights=weights[members], init=(U[c], V[c]), tol=tol, max_iter=max_iter)
        candidate = relative_errors(sub, solution.U.unsqueeze(0), solution.V.unsqueeze(0), solution.sigma,
                                    torch.zeros(sub.n, dtype=torch.long))
        w2 = weights[members].double() ** 2 * sub.norms2()
        if float((candidate * w2).sum()) < float((result.err2[members] * w2).sum()):
            U[c], V[c], sigma[members] = solution.U, solution.V, solution.sigma.to(sigma.dtype)
    err2 = relative_errors(stack, U, V, sigma, result.cluster)
    return CompressionResult(U=U, V=V, sigma=sigma, cluster=result.cluster, err2=err2)
