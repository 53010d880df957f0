"""Budgeted compression: rank allocation, nested truncation, per-module ranks end to end, Σ storage precision.

References are independent of the code under test: exhaustive search for the allocation, numpy SVD / dense ΔW for
the errors, a dense `W + U Σ Vᵀ` model (from the files) for the forward pass.
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from collection_fixtures import lora_delta, make_lora, sigma_delta
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from utils import target_linears, tiny_llama

import peft_jd
from peft_jd.compression import compress, extend_collection
from peft_jd.compression.algorithms import compress_stack, normalization_weights
from peft_jd.compression.allocation import allocate_ranks
from peft_jd.compression.nested import nest
from peft_jd.compression.sizes import Budget
from peft_jd.compression.stack import CanonicalStack
from peft_jd.core import BasesConfig, ShapeMismatchError, UsageError


TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ allocation
def test_allocation_matches_a_hand_solved_case():
    # Two modules, bytes 10·k. Module a halves its error with each rank, b drops a little: with 40 bytes the optimum
    # (by hand: gains a 0.5, 0.25, 0.125 vs b 0.1, 0.05) is a=3, b=1 (0.125 + 0.9 = 1.025).
    errors = {"a": [1.0, 0.5, 0.25, 0.125], "b": [1.0, 0.9, 0.85, 0.84]}
    costs = {"a": [10, 20, 30, 40], "b": [10, 20, 30, 40]}
    allocation = allocate_ranks(errors, costs, budget_bytes=50)
    assert allocation.ranks == {"a": 4, "b": 1}
    allocation = allocate_ranks(errors, costs, budget_bytes=40)
    assert allocation.ranks == {"a": 3, "b": 1}
    assert allocation.bytes_per_adapter == 40
    assert allocation.mean_err2 == pytest.approx((0.25 + 1.0) / 2)


def test_allocation_equals_exhaustive_search_on_convex_curves():
    rng = np.random.default_rng(0)
    for trial in range(20):
        errors, costs = {}, {}
        for m in range(3):
            drops = np.sort(rng.uniform(0.01, 0.3, 5))[::-1]  # decreasing gains: convex error curve
            errors[f"m{m}"] = list(1 - np.concatenate([[0], np.cumsum(drops)])[:5] * 0.9)
            unit = rng.integers(1, 4)
            costs[f"m{m}"] = [unit * k for k in range(1, 6)]
        budget = float(rng.integers(6, 25))
        best = min(
            (sum(errors[m][k - 1] for m, k in zip(errors, ks)), ks)
            for ks in itertools.product(range(1, 6), repeat=3)
            if sum(costs[m][k - 1] for m, k in zip(errors, ks)) <= budget
        )
        got = allocate_ranks(errors, costs, budget_bytes=budget)
        # Greedy by ratio is optimal up to the budget it cannot fill (knapsack remainder): within one step's gain.
        assert got.mean_err2 * 3 <= best[0] + 0.3 + 1e-12, trial
        assert got.bytes_per_adapter <= budget


def test_allocation_with_an_error_target_and_a_too_small_budget():
    errors = {"a": [0.8, 0.4, 0.2], "b": [0.6, 0.5, 0.45]}
    costs = {"a": [1, 2, 3], "b": [1, 2, 3]}
    allocation = allocate_ranks(errors, costs, target_err2=0.5)
    assert allocation.mean_err2 <= 0.5 and allocation.ranks == {"a": 2, "b": 1}
    with pytest.raises(UsageError, match="below the smallest"):
        allocate_ranks(errors, costs, budget_bytes=1.5)


@pytest.mark.parametrize("text,ratio,size", [("16x", 16.0, None), ("200000", None, 200000.0),
                                             ("150KB", None, 150000.0), ("1.5MiB", None, 1.5 * 2**20)])
def test_budget_parsing(text, ratio, size):
    budget = Budget.parse(text)
    assert (budget.ratio, budget.bytes_per_adapter) == (ratio, size)


@pytest.mark.parametrize("text", ["", "x", "-3x", "12 parsecs", "0x"])
def test_budget_parsing_refuses_nonsense(text):
    with pytest.raises(UsageError, match="cannot read budget"):
        Budget.parse(text)


# -------------------------------------------------------------------------------------------------- nesting
def _random_stack(n=6, r=3, d_out=20, d_in=16, seed=0) -> tuple[CanonicalStack, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    dense, lts, rts, ss = [], [], [], []
    for _ in range(n):
        delta = torch.randn(d_out, r, generator=generator, dtype=torch.float64) @ torch.randn(
            r, d_in, generator=generator, dtype=torch.float64)
        u, s, vh = np.linalg.svd(delta.numpy(), full_matrices=False)
        dense.append(delta)
        lts.append(torch.from_numpy(u[:, :r].T.copy()).float())
        rts.append(torch.from_numpy(vh[:r].copy()).float())
        ss.append(torch.from_numpy(s[:r].copy()))
    return CanonicalStack(torch.stack(lts), torch.stack(rts), torch.stack(ss)), dense


@pytest.mark.parametrize("method,clusters", [("jd-full", 1), ("jd-full", 2), ("jd-diag", 1), ("jd-diag", 2)])
def test_nested_truncation_errors_are_exact(method, clusters):
    stack, dense = _random_stack()
    result = compress_stack(stack, method, 8, clusters, generator=torch.Generator().manual_seed(0))
    nested = nest(result, stack, method == "jd-diag", normalization_weights(stack, True))
    for k in (1, 3, 5, 8):
        truncated = nested.truncate(k)
        for i, delta in enumerate(dense):
            c = int(truncated.cluster[i])
            sigma = truncated.sigma[i].double()
            sigma = sigma if sigma.dim() == 2 else torch.diag(sigma)
            approx = truncated.U[c].double() @ sigma @ truncated.V[c].double().T
            err2 = float((delta - approx).norm() ** 2 / delta.norm() ** 2)
            assert float(truncated.err2[i]) == pytest.approx(err2, rel=1e-3, abs=1e-6), (k, i)
    # Nested errors never increase with the rank, and the full rank keeps the solver's error.
    assert bool((nested.err2[:, 1:] <= nested.err2[:, :-1] + 1e-9).all())
    torch.testing.assert_close(nested.err2[:, -1], result.err2, atol=1e-6, rtol=1e-4)


def test_nested_full_truncation_is_the_best_sigma_for_its_bases():
    stack, dense = _random_stack(seed=1)
    result = compress_stack(stack, "jd-full", 6, 1, generator=torch.Generator().manual_seed(0))
    truncated = nest(result, stack, False, normalization_weights(stack, True)).truncate(4)
    U, V = truncated.U[0].double(), truncated.V[0].double()
    for i, delta in enumerate(dense):
        torch.testing.assert_close(truncated.sigma[i].double(), U.T @ delta @ V, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {name: make_lora(root / name, r=4, alpha=8, seed=seed) for seed, name in enumerate("abcdef")}


@pytest.fixture(scope="module")
def budgeted(loras, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("budgeted") / "collection"
    report = compress(list(loras.values()), out, budget="6x", progress=False)
    return out, report


def _module_ranks(collection: Path) -> dict[str, int]:
    config = BasesConfig.from_file(collection / "bases" / "jd_bases_config.json")
    return {key: config.rank_of(key) for key in config.modules}


def test_budget_gives_modules_different_ranks_within_the_budget(budgeted, loras):
    out, report = budgeted
    ranks = _module_ranks(out)
    assert len(set(ranks.values())) > 1, ranks
    memory = report.sizes["bytes"]
    assert memory["bytes_per_adapter"] <= memory["lora_bytes_per_adapter"] / 6 + 1e-6
    # Bytes from the files themselves: Σ tensors of one adapter + bases file / n.
    sigma_bytes = 0
    with safe_open(out / "adapters" / "a" / "adapter_model.safetensors", framework="pt") as handle:
        sigma_bytes = sum(handle.get_tensor(key).nbytes for key in handle.keys())
    with safe_open(out / "bases" / "jd_bases.safetensors", framework="pt") as handle:
        bases_bytes = sum(handle.get_tensor(key).nbytes for key in handle.keys())
    assert memory["bytes_per_adapter"] == pytest.approx(sigma_bytes + bases_bytes / len(loras))
    config = json.loads((out / "adapters" / "a" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {k: v for k, v in ranks.items() if v != config["r"]}
    assert json.loads((out / "bases" / "jd_bases_config.json").read_text())["format_version"] == 2


def test_budget_beats_the_uniform_rank_of_the_same_bytes(budgeted, loras, tmp_path):
    _, report = budgeted
    uniform = report.data["settings"]["uniform_rank"]
    plain = compress(list(loras.values()), tmp_path / "uniform", rank=uniform, progress=False)
    assert plain.sizes["bytes"]["bytes_per_adapter"] <= report.sizes["bytes"]["lora_bytes_per_adapter"] / 6
    assert report.mean_err2 <= plain.mean_err2 + 1e-9


def test_heterogeneous_ranks_forward_mixed_batch_and_merge_match_dense(budgeted, loras):
    out, report = budgeted
    base = tiny_llama()
    names = list(loras)[:3]
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(out / "adapters" / names[0]), adapter_name=names[0])
    peft_jd.load_adapters(model, [str(out / "adapters" / n) for n in names[1:]], progress=False)
    references = {}
    for name in names:
        merged = copy.deepcopy(base)
        for module_key, linear in target_linears(merged).items():
            delta = sigma_delta(out, name, module_key).float()
            linear.weight.data += delta
            lora = lora_delta(loras[name], module_key)
            err2 = float((lora - delta.double()).norm() ** 2 / lora.norm() ** 2)
            assert report.adapters[name]["err2"][module_key] == pytest.approx(err2, rel=2e-3, abs=1e-7)
        with torch.no_grad():
            references[name] = merged(TOKENS[:1]).logits[0]
    batch = TOKENS[:1].repeat(3, 1)
    with torch.no_grad():
        mixed = model(batch, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], references[name], atol=1e-4, rtol=1e-4)
    model.set_adapter(names[1])
    merged_model = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged_model(TOKENS[:1]).logits[0], references[names[1]], atol=1e-4, rtol=1e-4)


def test_heterogeneous_ranks_train_and_save_roundtrip(budgeted, tmp_path):
    out, _ = budgeted
    model = PeftModel.from_pretrained(tiny_llama(), str(out / "adapters" / "a"), is_trainable=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(TOKENS, labels=TOKENS).loss
    loss.backward()
    optimizer.step()
    model.save_pretrained(tmp_path / "trained")
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "trained"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, model(TOKENS).logits, atol=1e-5, rtol=1e-5)


def test_export_and_add_on_a_budgeted_collection(budgeted, loras, tmp_path):
    out, _ = budgeted
    export = peft_jd.export.export_adapter_to_lora(str(out / "adapters" / "b"))
    export.save_pretrained(tmp_path / "lora")
    lora = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lora"))
    jd = PeftModel.from_pretrained(tiny_llama(), str(out / "adapters" / "b"))
    with torch.no_grad():
        torch.testing.assert_close(lora(TOKENS).logits, jd(TOKENS).logits, atol=1e-4, rtol=1e-4)
    copy_dir = tmp_path / "collection"
    import shutil

    shutil.copytree(out, copy_dir)
    extra = make_lora(tmp_path / "g", r=4, alpha=8, seed=11)
    extend_collection(copy_dir, [f"g={extra}"], progress=False)
    added = PeftModel.from_pretrained(tiny_llama(), str(copy_dir / "adapters" / "g"))
    assert isinstance(added(TOKENS).logits, torch.Tensor)
    assert json.loads((copy_dir / "adapters" / "g" / "adapter_config.json").read_text())["rank_pattern"]


def test_an_adapter_with_another_rank_pattern_is_refused(budgeted, tmp_path):
    out, _ = budgeted
    import shutil

    shutil.copytree(out, tmp_path / "c")
    config_path = tmp_path / "c" / "adapters" / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    key = next(iter(config["rank_pattern"]))
    config["rank_pattern"][key] += 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(ShapeMismatchError, match="rank"):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "c" / "adapters" / "a"))


def test_float16_sigma_halves_sigma_bytes_and_keeps_the_update(loras, tmp_path):
    full = compress(list(loras.values()), tmp_path / "fp32", rank=4, progress=False)
    half = compress(list(loras.values()), tmp_path / "fp16", rank=4, progress=False, sigma_dtype="float16",
                    bases_dtype="float16")
    assert half.sizes["bytes"]["bytes_per_adapter"] == pytest.approx(full.sizes["bytes"]["bytes_per_adapter"] / 2)
    with safe_open(tmp_path / "fp16" / "adapters" / "a" / "adapter_model.safetensors", framework="pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}
    with torch.no_grad():
        a = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "fp32" / "adapters" / "a"))(TOKENS).logits
        b = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "fp16" / "adapters" / "a"))(TOKENS).logits
    torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


def test_budget_usage_errors(loras, tmp_path):
    with pytest.raises(UsageError, match="below the smallest"):
        compress(list(loras.values()), tmp_path / "x", budget="100000x", progress=False)
    with pytest.raises(UsageError, match="cannot be combined"):
        compress(list(loras.values()), tmp_path / "x", budget="8x", target_error=0.1, progress=False)


def test_per_module_allocation_for_an_error_target(loras, tmp_path):
    target = 0.5
    uniform = compress(list(loras.values()), tmp_path / "uniform", target_error=target, progress=False)
    allocated = compress(list(loras.values()), tmp_path / "allocated", target_error=target,
                         rank_allocation="per-module", progress=False)
    assert allocated.mean_err2 <= target + 1e-9
    # The uniform rank meets the target only on its probe modules; the allocation meets it over all of them, and
    # never needs more bytes than the uniform rank where that rank met it everywhere.
    if uniform.mean_err2 <= target:
        assert allocated.sizes["bytes"]["bytes_per_adapter"] <= uniform.sizes["bytes"]["bytes_per_adapter"] + 1e-6
    assert allocated.data["settings"]["rank_allocation"] == "per-module"


def _scaled_loras(loras: dict[str, Path], root: Path, module_key: str, factor: float) -> dict[str, Path]:
    """Copies of `loras` whose update on `module_key` is `factor` times larger (relative errors unchanged)."""
    scaled = {}
    for name, path in loras.items():
        shutil.copytree(path, root / name)
        weights = root / name / "adapter_model.safetensors"
        tensors = load_file(str(weights))
        tensors[f"base_model.model.{module_key}.lora_B.weight"] *= factor
        save_file(tensors, str(weights))
        scaled[name] = root / name
    return scaled


def test_energy_weighting_minimises_each_adapters_total_relative_error(loras, tmp_path):
    keys = list(target_linears(tiny_llama()))
    module_key = sorted(keys)[0]
    scaled = _scaled_loras(loras, tmp_path / "scaled", module_key, 10.0)
    reports = {weighting: compress(list(scaled.values()), tmp_path / weighting, budget="3x", progress=False,
                                   allocation_weighting=weighting)
               for weighting in ("module", "energy")}

    def adapter_error(weighting: str) -> float:
        """Mean over adapters of Σ_m ‖ΔW − ΔŴ‖² / Σ_m ‖ΔW‖², from the LoRA files and the collection's files."""
        total = []
        for name, path in scaled.items():
            deltas = {key: lora_delta(path, key) for key in keys}
            residual = sum(float((deltas[k] - sigma_delta(tmp_path / weighting, name, k)).pow(2).sum()) for k in keys)
            total.append(residual / sum(float(d.pow(2).sum()) for d in deltas.values()))
        return sum(total) / len(total)

    ranks = {weighting: _module_ranks(tmp_path / weighting) for weighting in reports}
    # The module holding most of every adapter's update gets a higher rank, and the error per adapter drops.
    assert ranks["energy"][module_key] > ranks["module"][module_key]
    assert adapter_error("energy") < adapter_error("module")
    assert reports["energy"].data["settings"]["allocation_weighting"] == "energy"
    for report in reports.values():
        memory = report.sizes["bytes"]
        assert memory["bytes_per_adapter"] <= memory["lora_bytes_per_adapter"] / 3 + 1e-6
    with pytest.raises(UsageError, match="allocation_weighting"):
        compress(list(loras.values()), tmp_path / "bad", budget="6x", allocation_weighting="adapter")


# ------------------------------------------------------------------------------------------------- fallback
@pytest.mark.parametrize("budget", [None, "5x"])
def test_fallback_adapters_get_private_clusters_served_in_the_mixed_batch(loras, tmp_path, budget):
    options = {"budget": budget} if budget else {"rank": 3}
    plain = compress(list(loras.values()), tmp_path / "plain", progress=False, **options)
    threshold = sorted(e for entry in plain.adapters.values() for e in entry["err2"].values())[-4]
    report = compress(list(loras.values()), tmp_path / "fb", progress=False, fallback_error=threshold, **options)
    out = tmp_path / "fb"
    moved = {(name, key) for key, module in report.modules.items() for name in module["fallback"]}
    assert moved, "some (adapter, module) pairs must be above the threshold"
    for name, key in moved:
        # Private cluster: the LoRA's own top-k factors, k the module's rank (its error is the SVD tail).
        lora = lora_delta(loras[name], key)
        k = BasesConfig.from_file(out / "bases" / "jd_bases_config.json").rank_of(key)
        s = np.linalg.svd(lora.numpy(), compute_uv=False)
        assert report.adapters[name]["err2"][key] == pytest.approx(float((s[k:] ** 2).sum() / (s**2).sum()),
                                                                   abs=1e-6)
        assert report.adapters[name]["err2"][key] <= plain.adapters[name]["err2"][key] + 1e-9
    if budget:
        memory = report.sizes["bytes"]
        assert memory["bytes_per_adapter"] <= memory["lora_bytes_per_adapter"] / 5 + 1e-6
    if not budget:  # private clusters add bases bytes (with a budget, they are paid for by lower ranks elsewhere)
        assert report.sizes["bases_params"] > plain.sizes["bases_params"]
    # Served: a mixed batch of a fallback adapter and others equals the dense references from the files.
    name = sorted(moved)[0][0]
    names = [name] + [n for n in loras if n != name][:2]
    base = tiny_llama()
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(out / "adapters" / names[0]), adapter_name=names[0])
    peft_jd.load_adapters(model, [str(out / "adapters" / n) for n in names[1:]], progress=False)
    with torch.no_grad():
        mixed = model(TOKENS[:1].repeat(3, 1), adapter_names=names).logits
    for row, adapter in enumerate(names):
        merged = copy.deepcopy(base)
        for module_key, linear in target_linears(merged).items():
            linear.weight.data += sigma_delta(out, adapter, module_key).float()
        with torch.no_grad():
            torch.testing.assert_close(mixed[row], merged(TOKENS[:1]).logits[0], atol=1e-4, rtol=1e-4)
