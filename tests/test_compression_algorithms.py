"""Compression algorithms against independent references (numpy SVD, dense ΔW, the paper's alternating SVD)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from peft_jd.compression.algorithms import compress_stack, module_generator, project_stack
from peft_jd.compression.jd_diag import jd_diag
from peft_jd.compression.jd_full import jd_full
from peft_jd.compression.stack import stack_from_factors


D_OUT, D_IN = 40, 30


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen))[0]


def _shared_collection(n: int, k: int, gen: torch.Generator, clusters: int = 1, diagonal: bool = False):
    """LoRA factors whose updates truly share bases: ΔW_i = U_c Σ_i V_cᵀ, split into arbitrary factors B_i, A_i."""
    factors, truth, dense = [], [], []
    bases = [(torch.randn(D_OUT, k, generator=gen), torch.randn(D_IN, k, generator=gen)) if diagonal
             else (_orthonormal(D_OUT, k, gen), _orthonormal(D_IN, k, gen)) for _ in range(clusters)]
    for i in range(n):
        c = i % clusters
        U, V = bases[c]
        sigma = torch.diag(torch.randn(k, generator=gen)) if diagonal else torch.randn(k, k, generator=gen)
        mix = torch.randn(k, k, generator=gen) + 3 * torch.eye(k)  # factors are not the bases themselves
        scale = float(torch.rand(1, generator=gen)) * 2 + 0.1
        lora_b, lora_a = U @ sigma @ mix, torch.linalg.solve(mix, V.T)
        factors.append((lora_a, lora_b, scale))
        truth.append(c)
        dense.append(scale * (lora_b.double() @ lora_a.double()))
    return factors, torch.tensor(truth), dense


def _dense_error2(delta: torch.Tensor, U: torch.Tensor, sigma: torch.Tensor, V: torch.Tensor) -> float:
    sigma = sigma if sigma.dim() == 2 else torch.diag(sigma)
    approx = U.double() @ sigma.double() @ V.double().T
    return float((delta - approx).norm() ** 2 / delta.norm() ** 2)


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    pairs = {(int(x), int(y)) for x, y in zip(a, b)}
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_canonical_stack_is_the_exact_svd():
    gen = torch.Generator().manual_seed(0)
    factors = [(torch.randn(r, D_IN, generator=gen), torch.randn(D_OUT, r, generator=gen), 0.5) for r in (3, 6, 1)]
    factors.append((torch.randn(4, D_IN, generator=gen), torch.zeros(D_OUT, 4), 2.0))  # an untrained LoRA
    stack = stack_from_factors(factors)
    assert stack.r == 6
    for i, (lora_a, lora_b, scale) in enumerate(factors):
        delta = scale * (lora_b.double() @ lora_a.double())
        expected = np.linalg.svd(delta.numpy(), compute_uv=False)[: stack.r]
        np.testing.assert_allclose(stack.s[i].numpy(), expected, rtol=1e-5, atol=1e-5 * max(expected[0], 1e-30))
        torch.testing.assert_close(stack.dense(i), delta, rtol=0, atol=1e-5 * max(float(delta.abs().max()), 1e-30))


def test_jd_full_recovers_truly_shared_bases():
    gen = torch.Generator().manual_seed(1)
    factors, _, dense = _shared_collection(n=12, k=4, gen=gen)
    result = compress_stack(stack_from_factors(factors), "jd-full", rank=4, generator=module_generator(0, "m"))
    for i, delta in enumerate(dense):
        error = _dense_error2(delta, result.U[0], result.sigma[i], result.V[0])
        assert error < 1e-10
        assert abs(float(result.err2[i]) - error) < 1e-10
    torch.testing.assert_close(result.U[0].T @ result.U[0], torch.eye(4), atol=1e-5, rtol=0)


def test_jd_diag_recovers_a_planted_cp_collection():
    gen = torch.Generator().manual_seed(2)
    factors, _, dense = _shared_collection(n=20, k=4, gen=gen, diagonal=True)
    result = compress_stack(stack_from_factors(factors), "jd-diag", rank=4, generator=module_generator(0, "m"))
    assert result.sigma.shape == (20, 4)
    errors = [_dense_error2(delta, result.U[0], result.sigma[i], result.V[0]) for i, delta in enumerate(dense)]
    assert max(errors) < 1e-8
    np.testing.assert_allclose(result.err2.numpy(), errors, atol=1e-8)


@pytest.mark.parametrize("method", ["jd-full", "jd-diag"])
@pytest.mark.parametrize("clusters", [1, 3])
def test_objective_never_increases(method, clusters):
    gen = torch.Generator().manual_seed(3)
    factors = [(torch.randn(5, D_IN, generator=gen), torch.randn(D_OUT, 5, generator=gen), 1.0) for _ in range(15)]
    result = compress_stack(stack_from_factors(factors), method, rank=4, clusters=clusters, tol=1e-9, max_iter=60,
                            generator=module_generator(0, "m"))
    history = np.array(result.history)
    assert len(history) >= 2
    assert np.all(np.diff(history) <= 1e-6 * history[:-1]), history


def test_jd_full_with_one_adapter_is_the_truncated_svd():
    gen = torch.Generator().manual_seed(4)
    lora_a, lora_b = torch.randn(6, D_IN, generator=gen), torch.randn(D_OUT, 6, generator=gen)
    delta = 0.7 * (lora_b.double() @ lora_a.double())
    result = compress_stack(stack_from_factors([(lora_a, lora_b, 0.7)]), "jd-full", rank=3)
    u, s, vt = np.linalg.svd(delta.numpy())
    truncated = (u[:, :3] * s[:3]) @ vt[:3]
    approx = result.U[0].double() @ result.sigma[0].double() @ result.V[0].double().T
    np.testing.assert_allclose(approx.numpy(), truncated, atol=1e-5 * s[0])
    assert abs(float(result.err2[0]) - (s[3:] ** 2).sum() / (s**2).sum()) < 1e-6


def test_svd_baseline_is_per_adapter_truncated_svd():
    gen = torch.Generator().manual_seed(5)
    factors = [(torch.randn(r, D_IN, generator=gen), torch.randn(D_OUT, r, generator=gen), 2.0) for r in (2, 5)]
    result = compress_stack(stack_from_factors(factors), "svd", rank=3)
    assert result.cluster.tolist() == [0, 1] and result.U.shape == (2, D_OUT, 3) and result.sigma.shape == (2, 3)
    for i, (lora_a, lora_b, scale) in enumerate(factors):
        u, s, vt = np.linalg.svd(scale * (lora_b.double() @ lora_a.double()).numpy())
        approx = result.U[i].double() @ torch.diag(result.sigma[i].double()) @ result.V[i].double().T
        np.testing.assert_allclose(approx.numpy(), (u[:, :3] * s[:3]) @ vt[:3], atol=1e-5 * s[0])
        np.testing.assert_allclose(float(result.err2[i]), (s[3:] ** 2).sum() / (s**2).sum(), atol=1e-7)


@pytest.mark.parametrize("method", ["jd-full", "jd-diag"])
def test_planted_clusters_are_recovered(method):
    gen = torch.Generator().manual_seed(6)
    factors, truth, dense = _shared_collection(n=24, k=3, gen=gen, clusters=3, diagonal=method == "jd-diag")
    order = torch.randperm(len(factors), generator=gen)
    factors, truth, dense = [factors[i] for i in order], truth[order], [dense[i] for i in order]
    result = compress_stack(stack_from_factors(factors), method, rank=3, clusters=3,
                            generator=module_generator(0, "m"))
    assert result.U.shape[0] == 3
    assert _same_partition(result.cluster, truth)
    for i, delta in enumerate(dense):
        c = int(result.cluster[i])
        assert _dense_error2(delta, result.U[c], result.sigma[i], result.V[c]) < 1e-8


def _reference_alternating_svd(dense: list[torch.Tensor], k: int, iterations: int, seed: int) -> float:
    """The paper's JD-Full: alternate exact top-k SVDs of [ΔW_i V] and [ΔW_iᵀ U] (dense, normalised)."""
    rng = np.random.default_rng(seed)
    mats = [(d / d.norm()).numpy() for d in dense]
    V = np.linalg.qr(rng.standard_normal((D_IN, k)))[0]
    for _ in range(iterations):
        U = np.linalg.svd(np.hstack([m @ V for m in mats]), full_matrices=False)[0][:, :k]
        V = np.linalg.svd(np.hstack([m.T @ U for m in mats]), full_matrices=False)[0][:, :k]
    return float(np.mean([1 - np.linalg.norm(U.T @ m @ V) ** 2 for m in mats]))


def test_jd_full_not_worse_than_the_reference_alternation():
    gen = torch.Generator().manual_seed(7)
    latent_u, latent_v = _orthonormal(D_OUT, 10, gen), _orthonormal(D_IN, 10, gen)
    factors, dense = [], []
    for _ in range(30):  # trained-like: a shared latent subspace plus noise, heterogeneous norms
        lora_b = latent_u @ torch.randn(10, 4, generator=gen) + 0.3 * torch.randn(D_OUT, 4, generator=gen)
        lora_a = torch.randn(4, 10, generator=gen) @ latent_v.T + 0.3 * torch.randn(4, D_IN, generator=gen)
        scale = float(torch.exp(torch.randn(1, generator=gen)))
        factors.append((lora_a, lora_b, scale))
        dense.append(scale * lora_b.double() @ lora_a.double())
    result = compress_stack(stack_from_factors(factors), "jd-full", rank=6, generator=module_generator(0, "m"))
    reference = _reference_alternating_svd(dense, k=6, iterations=10, seed=0)
    assert float(result.err2.mean()) <= reference + 1e-3


def test_results_are_deterministic_for_a_seed():
    gen = torch.Generator().manual_seed(8)
    factors = [(torch.randn(4, D_IN, generator=gen), torch.randn(D_OUT, 4, generator=gen), 1.0) for _ in range(12)]
    runs = [compress_stack(stack_from_factors(factors), "jd-full", rank=3, clusters=2,
                           generator=module_generator(seed, "m")) for seed in (0, 0)]
    assert torch.equal(runs[0].U, runs[1].U) and torch.equal(runs[0].sigma, runs[1].sigma)
    assert torch.equal(runs[0].cluster, runs[1].cluster)


def test_projection_onto_existing_bases():
    gen = torch.Generator().manual_seed(9)
    factors, truth, dense = _shared_collection(n=9, k=3, gen=gen, clusters=3)
    fitted = compress_stack(stack_from_factors(factors), "jd-full", rank=3, clusters=3,
                            generator=module_generator(0, "m"))
    cluster, sigma, err2 = project_stack(stack_from_factors(factors[:3]), fitted.U, fitted.V, diagonal=False)
    assert cluster.tolist() == fitted.cluster[:3].tolist()
    assert float(err2.max()) < 1e-9
    torch.testing.assert_close(sigma, fitted.sigma[:3], atol=1e-4, rtol=1e-4)


class _ShapeGuard(TorchDispatchMode):
    """Fails if any op produces a tensor with two dimensions ≥ `limit` (a dense ΔW or a d×d matrix)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and sum(size >= self.limit for size in tensor.shape) >= 2:
                raise AssertionError(f"{func} produced a dense {tuple(tensor.shape)} tensor")
        return out


@pytest.mark.parametrize("method,clusters", [("jd-full", 1), ("jd-full", 2), ("jd-diag", 1), ("jd-diag", 2)])
def test_joint_methods_never_form_dense_updates(method, clusters):
    gen = torch.Generator().manual_seed(10)
    d_out, d_in = 300, 200  # larger than n·r, so only a dense ΔW_i or a d×d product can have two dims ≥ 200
    factors = [(torch.randn(3, d_in, generator=gen), torch.randn(d_out, 3, generator=gen), 1.0) for _ in range(20)]
    stack = stack_from_factors(factors)
    with _ShapeGuard(limit=min(d_out, d_in)):
        compress_stack(stack, method, rank=4, clusters=clusters, max_iter=5, generator=module_generator(0, "m"))


def test_solvers_reject_rank_above_dimensions():
    stack = stack_from_factors([(torch.randn(2, 5), torch.randn(4, 2), 1.0)])
    for solver in (jd_full, jd_diag):
        with pytest.raises(ValueError, match="rank 5"):
            solver(stack, 5)


@pytest.mark.parametrize("method", ["jd-full", "jd-diag"])
def test_rank_equal_to_the_narrow_dimension(method):
    """k = d_in: V spans the whole input space; U must still be found without spurious directions."""
    gen = torch.Generator().manual_seed(11)
    factors = [(torch.randn(5, D_IN, generator=gen), torch.randn(D_OUT, 5, generator=gen), 1.0) for _ in range(4)]
    result = compress_stack(stack_from_factors(factors), method, rank=D_IN, max_iter=200,
                            generator=module_generator(0, "m"))
    assert float(result.err2.max()) < 1e-8


def test_sampled_seeding_then_reassignment_recovers_clusters():
    """Many adapters: seeding and first solves on a sample, the first reassignment places everyone."""
    from peft_jd.compression.algorithms import normalization_weights, relative_errors
    from peft_jd.compression.clustering import cluster_compress

    gen = torch.Generator().manual_seed(12)
    factors, truth, dense = _shared_collection(n=60, k=3, gen=gen, clusters=3)
    stack = stack_from_factors(factors)
    result = cluster_compress(stack, 3, 3, jd_full, diagonal=False, weights=normalization_weights(stack, True),
                              tol=1e-6, max_iter=50, seed_sample=8, generator=module_generator(0, "m"))
    assert (result.cluster >= 0).all() and _same_partition(result.cluster, truth)
    err2 = relative_errors(stack, result.U, result.V, result.sigma, result.cluster)
    assert float(err2.max()) < 1e-10
    assert np.all(np.diff(result.history) <= 1e-9)


def test_threaded_cluster_solves_match_single_threaded():
    gen = torch.Generator().manual_seed(13)
    factors = [(torch.randn(4, D_IN, generator=gen), torch.randn(D_OUT, 4, generator=gen), 1.0) for _ in range(30)]
    stack = stack_from_factors(factors)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(compress_stack(stack, "jd-full", rank=3, clusters=3, generator=module_generator(0, "m")))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0].cluster, results[1].cluster)
    torch.testing.assert_close(results[0].err2, results[1].err2, atol=1e-6, rtol=0)
    assert torch.get_num_threads() == previous
