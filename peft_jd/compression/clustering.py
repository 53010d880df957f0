"""Clustered joint compression: each cluster of adapters gets its own bases.

Alternates (a) JD of every cluster (in parallel, warm-started from its previous bases) and (b) reassignment of every
adapter to the cluster whose bases keep most of its energy with its own best `Σ`. Both steps can only raise the
weighted captured energy, so the objective is monotone once every adapter is assigned. Initialisation: k-means++-style
seeding (see `kmeanspp_seeds`) with the cheap one-sided signature "fraction of `ΔW_j`'s energy inside a center
subspace" on the narrower side of the module, on a sample of the adapters when there are many; the first reassignment
then places everyone. Reassignment for orthonormal bases is pruned by a one-sided bound (`reassign_full`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .jd_diag import _solve
from .jd_full import orthonormal_complement, pad_basis
from .result import CompressionResult
from .stack import CanonicalStack
from .threads import few_threads, gemm, parallel_map


# Memory cap for the (n·r, clusters·k) projection blocks of the reassignment step.
_SCORE_BLOCK_ELEMENTS = 1 << 25


def _own_bases(stack: CanonicalStack, index: int, k: int,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's own top-k singular vectors (its truncated SVD is its best possible rank-k fit).

    Ranks below `k` (and zero singular values) are completed with random orthonormal directions.
    """
    U = orthonormal_complement(stack.lt[index, :k].T * (stack.s[index, :k] > 0), None)
    V = orthonormal_complement(stack.rt[index, :k].T * (stack.s[index, :k] > 0), None)
    return pad_basis(U, stack.d_out, k, generator), pad_basis(V, stack.d_in, k, generator)


def _one_sided_fraction(side: torch.Tensor, basis: torch.Tensor, s: torch.Tensor,
                        norms2: torch.Tensor) -> torch.Tensor:
    """Fraction of each update's energy inside `span(basis)` on one side (1 for all-zero updates).

    Args:
        side: `(m, r, d)` singular vectors of that side.
        basis: `(d, w)` orthonormal.
        s: `(m, r)` singular values.
        norms2: `(m,)` squared norms.
    """
    m, r, d = side.shape
    proj = gemm(side.reshape(m * r, d), basis.float()).reshape(m, r, -1).double()
    energy = (proj.pow(2).sum(2) * s**2).sum(1)
    return torch.where(norms2 > 0, energy / norms2.clamp_min(1e-300), 1.0).clamp(0, 1)


def _prune_centers(fractions: torch.Tensor, keep: int) -> list[int]:
    """Greedily drops the center whose loss costs least uncaptured energy until `keep` remain.

    Args:
        fractions: `(n, m)` captured energy fraction of every adapter by every center.
        keep: Number of centers to keep.
    """
    alive = list(range(fractions.shape[1]))
    while len(alive) > keep:
        current = fractions[:, alive]
        top2 = current.topk(min(2, len(alive)), dim=1)
        owner = top2.indices[:, 0]
        loss = top2.values[:, 0] - top2.values[:, 1]
        cost = torch.zeros(len(alive), dtype=fractions.dtype).index_add_(0, owner, loss)
        alive.pop(int(cost.argmin()))
    return alive


def kmeanspp_seeds(stack: CanonicalStack, k: int, c: int, generator: torch.Generator | None,
                   probe: int = 256, power: float = 4.0, oversample: float = 1.5) -> tuple[list[int], torch.Tensor]:
    """k-means++-style seeding on one-sided subspace signatures, on the narrower side of the module.

    A single rank-`k` adapter sees only part of its cluster's subspace, so each seed's *center* is the `2k`-dim range
    of the seed plus its nearest neighbours (found on a probe of at most `probe` adapters): members of the seed's
    cluster then fall almost entirely inside the center, others almost not. Seeds are drawn with probability ∝ Dᵖ
    (D: energy fraction outside every center so far; `p = power` = 4 rather than k-means++'s 2, so a second seed in
    an already covered cluster is rare), `oversample · c` of them, then the centers whose removal loses least
    captured energy are dropped until `c` remain (duplicates go first).

    Returns:
        Up to `c` distinct seed adapters (fewer when all others are captured exactly), and the assignment of every
        adapter to the kept center that holds most of its energy.
    """
    side = stack.lt if stack.d_out <= stack.d_in else stack.rt
    norms2 = stack.norms2()
    weighted_s = stack.s.float().unsqueeze(-1)
    probe_idx = torch.randperm(stack.n, generator=generator)[: min(probe, stack.n)]
    neighbours = max(1, probe_idx.numel() // (2 * c))
    width = min(2 * k, side.shape[2])
    draws = min(stack.n, max(c, round(oversample * c)))
    fractions = torch.zeros(stack.n, draws, dtype=torch.float64)
    best = torch.where(norms2 > 0, 0.0, 1.0).double()
    probe_side, probe_s, probe_norms2 = side[probe_idx], stack.s[probe_idx], norms2[probe_idx]
    seeds = [int(torch.randint(stack.n, (1,), generator=generator))]
    while True:
        seed = seeds[-1]
        close = _one_sided_fraction(probe_side, side[seed, :k].T, probe_s, probe_norms2)
        group = torch.cat([torch.tensor([seed]), probe_idx[close.topk(neighbours).indices]]).unique()
        mix = torch.randn(group.numel(), stack.r, width, generator=generator) * weighted_s[group]
        center = orthonormal_complement(gemm(side[group].reshape(-1, side.shape[2]).T, mix.reshape(-1, width)), None)
        fraction = _one_sided_fraction(side, center, stack.s, norms2)
        fraction[seed] = 1.0
        fractions[:, len(seeds) - 1] = fraction
        best = torch.maximum(best, fraction)
        distance = (1 - best).clamp_min(0) ** power
        distance[seeds] = 0
        if len(seeds) == draws or float(distance.sum()) <= 0:
            break  # enough draws, or every adapter is captured exactly (fewer distinct clusters than asked)
        seeds.append(int(torch.multinomial(distance / distance.sum(), 1, generator=generator)))
    kept = _prune_centers(fractions[:, : len(seeds)], min(c, len(seeds)))
    return [seeds[j] for j in kept], fractions[:, kept].argmax(1)


def captured_energy(stack: CanonicalStack, U: torch.Tensor, V: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """Energy of every update kept by every cluster's bases with its best Σ: `(n, c)` fp64.

    Args:
        stack: The adapters.
        U: `(c, d_out, k)` bases (orthonormal for full Σ).
        V: `(c, d_in, k)`.
        diagonal: Diagonal Σ (least squares `b G⁻¹ b`) instead of full Σ (`‖Uᵀ ΔW V‖²`).
    """
    c, _, k = U.shape
    per_block = max(1, _SCORE_BLOCK_ELEMENTS // max(1, stack.n * stack.r * k))
    out = torch.empty(stack.n, c, dtype=torch.float64)
    for start in range(0, c, per_block):
        block = slice(start, min(c, start + per_block))
        width = block.stop - block.start
        Us = U[block].permute(1, 0, 2).reshape(U.shape[1], -1).float()
        Vs = V[block].permute(1, 0, 2).reshape(V.shape[1], -1).float()
        Q = gemm(stack.flat_lt(), Us).reshape(stack.n, stack.r, width, k).double()
        P = gemm(stack.flat_rt(), Vs).reshape(stack.n, stack.r, width, k).double()
        P = P * stack.s.view(stack.n, stack.r, 1, 1)
        if diagonal:
            b = (Q * P).sum(1)  # (n, width, k)
            for j in range(width):
                Uj, Vj = U[start + j].double(), V[start + j].double()
                G = (Uj.T @ Uj) * (Vj.T @ Vj)
                out[:, start + j] = (_solve(G, b[:, j]) * b[:, j]).sum(1)
        else:
            sigma = Q.permute(0, 2, 3, 1) @ P.permute(0, 2, 1, 3)  # (n, width, k, k)
            out[:, block] = sigma.pow(2).sum((2, 3))
    return out


Solver = Callable[..., object]


def _exact_for_pairs(stack: CanonicalStack, U: torch.Tensor, V: torch.Tensor, rows: torch.Tensor,
                     c: int) -> torch.Tensor:
    """`‖U_cᵀ ΔW_i V_c‖²` for the adapters `rows` (orthonormal bases)."""
    sub = stack.select(rows)
    Q = gemm(sub.flat_lt(), U[c].float()).reshape(sub.n, sub.r, -1).double()
    P = gemm(sub.flat_rt(), V[c].float()).reshape(sub.n, sub.r, -1).double() * sub.s.unsqueeze(-1)
    return (Q.transpose(1, 2) @ P).pow(2).sum((1, 2))


def reassign_full(stack: CanonicalStack, U: torch.Tensor, V: torch.Tensor, cluster: torch.Tensor,
                  current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cluster of every adapter for orthonormal bases (full Σ), pruned by a one-sided bound.

    `‖U_cᵀ ΔW_i V_c‖² ≤ ‖U_cᵀ L_i S_i‖²` (the narrower side, one GEMM for all clusters); the exact energy is only
    computed for the pairs whose bound beats the adapter's current cluster, so the cost is about one projection of
    the stack instead of two.

    Args:
        stack: The adapters.
        U: `(c, d_out, k)` orthonormal.
        V: `(c, d_in, k)` orthonormal.
        cluster: `(n,)` current clusters; -1 for adapters not assigned yet (they get the best of the 3 clusters
            with the highest bound).
        current: `(n,)` energy kept by the current clusters (-1 if unassigned).

    Returns:
        New clusters (the current one unless another is strictly better) and the energy they keep.
    """
    left = stack.d_out <= stack.d_in
    side, bases = (stack.lt, U) if left else (stack.rt, V)
    c, _, k = bases.shape
    per_block = max(1, _SCORE_BLOCK_ELEMENTS // max(1, stack.n * stack.r * k))
    bound = torch.empty(stack.n, c, dtype=torch.float64)
    weights = (stack.s**2).unsqueeze(-1)
    for start in range(0, c, per_block):
        block = slice(start, min(c, start + per_block))
        stacked = bases[block].permute(1, 0, 2).reshape(bases.shape[1], -1).float()
        proj = gemm(side.reshape(-1, side.shape[2]), stacked).reshape(stack.n, stack.r, -1, k).double()
        bound[:, block] = (proj.pow(2).sum(3) * weights).sum(1)
    best, best_energy = cluster.clone(), current.clone()
    candidates = bound > current.unsqueeze(1) * (1 + 1e-9) + 1e-300
    assigned = (cluster >= 0).nonzero().squeeze(1)
    candidates[assigned, cluster[assigned]] = False
    unassigned = (cluster < 0).nonzero().squeeze(1)
    if unassigned.numel():
        top = bound[unassigned].topk(min(3, c), dim=1).indices
        candidates[unassigned] = False
        candidates[unassigned.unsqueeze(1), top] = True
    for target in candidates.any(0).nonzero().squeeze(1).tolist():
        rows = candidates[:, target].nonzero().squeeze(1)
        energy = _exact_for_pairs(stack, U, V, rows, target)
        better = energy > best_energy[rows] * (1 + 1e-9) + 1e-300
        best[rows[better]], best_energy[rows[better]] = target, energy[better]
    return best, best_energy


def reassign_dense(stack: CanonicalStack, U: torch.Tensor, V: torch.Tensor, cluster: torch.Tensor,
                   current: torch.Tensor, diagonal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cluster of every adapter (-1: not assigned yet) from the exact energies of all pairs (any bases)."""
    energy = captured_energy(stack, U, V, diagonal)
    assigned = cluster >= 0
    current = torch.where(assigned, energy.gather(1, cluster.clamp_min(0).unsqueeze(1)).squeeze(1), current)
    best_value, best = energy.max(1)
    better = best_value > current * (1 + 1e-9) + 1e-300
    return torch.where(better, best, cluster), torch.where(better, best_value, current)


def _fill_empty(stack: CanonicalStack, k: int, cluster: torch.Tensor, loss: torch.Tensor,
                bases: list[tuple[torch.Tensor, torch.Tensor]], generator: torch.Generator | None) -> None:
    """Moves the worst-fitted adapter (from a cluster of ≥ 2) into each empty cluster, with its own bases."""
    c = len(bases)
    for empty in range(c):
        sizes = torch.bincount(cluster, minlength=c)
        if sizes[empty] > 0:
            continue
        movable = (sizes[cluster] >= 2) & (loss > 0)
        if not bool(movable.any()):
            return
        worst = int(torch.where(movable, loss, -1.0).argmax())
        cluster[worst] = empty
        loss[worst] = 0
        bases[empty] = _own_bases(stack, worst, k, generator)


@few_threads()
def cluster_compress(
    stack: CanonicalStack,
    k: int,
    num_clusters: int,
    solver: Solver,
    diagonal: bool,
    weights: torch.Tensor,
    tol: float,
    max_iter: int,
    max_rounds: int = 3,
    round_iter: int = 3,
    seed_sample: int = 512,
    generator: torch.Generator | None = None,
) -> CompressionResult:
    """Clustered JD of one module.

    Args:
        stack: The adapters.
        k: Rank of every cluster's bases.
        num_clusters: Number of clusters (at most the number of adapters; fewer if adapters coincide).
        solver: `jd_full` or `jd_diag` (called with `stack, k, weights=, init=, tol=, max_iter=, generator=`).
        diagonal: Whether the solver fits diagonal Σ (for the reassignment criterion).
        weights: Per-adapter weights of the objective.
        tol: Convergence tolerance of the per-cluster solves.
        max_iter: Iterations of the final per-cluster solves.
        max_rounds: Maximum number of reassignment rounds.
        round_iter: Iterations of the per-cluster solves between reassignments (warm-started).
        seed_sample: With more adapters than `max(seed_sample, 10·clusters)`, seeding and the first solves use a
            random sample of that size; the first reassignment then places everyone (saves most of the seeding
            GEMMs over the whole stack).
        generator: Random generator of the seeding.
    """
    num_clusters = min(num_clusters, stack.n)
    sample_size = max(seed_sample, 10 * num_clusters)
    if stack.n > sample_size:
        sample = torch.randperm(stack.n, generator=generator)[:sample_size].sort().values
        local_seeds, local_cluster = kmeanspp_seeds(stack.select(sample), k, num_clusters, generator)
        seeds = sample[local_seeds].tolist()
        cluster = torch.full((stack.n,), -1, dtype=torch.long)
        cluster[sample] = local_cluster
        max_rounds = max(1, max_rounds)
    else:
        seeds, cluster = kmeanspp_seeds(stack, k, num_clusters, generator)
    bases = [_own_bases(stack, seed, k, generator) for seed in seeds]
    weights2, norms2 = weights.double() ** 2, stack.norms2()
    total = float((weights2 * norms2).sum())
    result = CompressionResult(U=torch.empty(0), V=torch.empty(0), sigma=torch.empty(0), cluster=cluster,
                             captured=torch.empty(0))

    def solve_all(iterations: int, warm: bool = True) -> list:
        # Independent per-cluster generators drawn up front: the parallel schedule cannot change the result.
        seeds_c = torch.randint(2**62, (len(bases),), generator=generator).tolist()

        def solve(c: int):
            members = (cluster == c).nonzero().squeeze(1)
            if members.numel() == 0:
                return None
            return solver(stack.select(members), k, weights=weights[members], init=bases[c] if warm else None,
                          tol=tol, max_iter=iterations, generator=torch.Generator().manual_seed(seeds_c[c]))

        sizes = torch.bincount(cluster[cluster >= 0], minlength=len(bases))
        order = sorted(range(len(bases)), key=lambda c: -int(sizes[c]))  # largest first balances the workers
        solved = [None] * len(bases)
        for c, solution in zip(order, parallel_map(solve, order)):
            solved[c] = solution
            if solution is not None:
                bases[c] = (solution.U, solution.V)
                result.iterations += solution.iterations
        if bool((cluster >= 0).all()):  # the objective of a partial assignment is not comparable
            captured = _cluster_captured(solved, cluster, stack.n)
            result.history.append(max(0.0, 1 - float((weights2 * captured).sum()) / total) if total > 0 else 0.0)
        return solved

    # The solver's own (HOSVD-like) start beats a single seed adapter's subspace.
    solved = solve_all(min(round_iter, max_iter), warm=False)
    for _ in range(max_rounds):
        result.rounds += 1
        U = torch.stack([b[0] for b in bases]).float()
        V = torch.stack([b[1] for b in bases]).float()
        current = torch.where(cluster >= 0, _cluster_captured(solved, cluster, stack.n), -1.0)
        if diagonal:
            new_cluster, energy = reassign_dense(stack, U, V, cluster, current, diagonal=True)
        else:
            new_cluster, energy = reassign_full(stack, U, V, cluster, current)
        _fill_empty(stack, k, new_cluster, weights2 * (norms2 - energy).clamp_min(0), bases, generator)
        if bool((new_cluster == cluster).all()):
            break
        cluster = new_cluster
        solved = solve_all(min(round_iter, max_iter))
    if not all(solution is None or solution.converged for solution in solved):
        solved = solve_all(max_iter)
    return _assemble(result, solved, cluster, stack, diagonal)


def _cluster_captured(solved: list, cluster: torch.Tensor, n: int) -> torch.Tensor:
    captured = torch.zeros(n, dtype=torch.float64)
    for c, solution in enumerate(solved):
        if solution is not None:
            captured[cluster == c] = solution.captured
    return captured


def _assemble(result: CompressionResult, solved: list, cluster: torch.Tensor, stack: CanonicalStack,
              diagonal: bool) -> CompressionResult:
    """Drops clusters left empty and gathers the per-adapter Σ in the original adapter order."""
    kept = [c for c, solution in enumerate(solved) if solution is not None]
    renumber = torch.full((len(solved),), -1, dtype=torch.long)
    renumber[kept] = torch.arange(len(kept))
    k = solved[kept[0]].U.shape[1]
    result.U = torch.stack([solved[c].U for c in kept])
    result.V = torch.stack([solved[c].V for c in kept])
    result.sigma = torch.zeros((stack.n, k) if diagonal else (stack.n, k, k))
    for c in kept:
        result.sigma[cluster == c] = solved[c].sigma
    result.captured = _cluster_captured(solved, cluster, stack.n)
    result.cluster = renumber[cluster]
    return result
