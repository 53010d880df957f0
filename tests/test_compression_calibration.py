"""Activation-aware compression: statistics collection, whitening, and what it optimises.

References: hooks written here for the statistics, the plain compression for the white case, numpy for the activation
errors, dense `W + U Σ Vᵀ` from the files for the served update.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from collection_fixtures import lora_delta, make_lora, sigma_delta
from utils import TARGETS, target_linears, tiny_llama

from peft_jd.compression import compress, extend_collection
from peft_jd.compression.calibration import InputStatistics, collect_input_statistics
from peft_jd.core import UsageError


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {name: make_lora(root / name, r=4, alpha=8, seed=seed) for seed, name in enumerate("abcde")}


def _module_keys() -> list[str]:
    return sorted(target_linears(tiny_llama()))


def _statistics(moment_of) -> InputStatistics:
    keys = _module_keys()
    linears = target_linears(tiny_llama())
    moments = {i: moment_of(linears[key].in_features, i) for i, key in enumerate(keys)}
    return InputStatistics(moments, {key: i for i, key in enumerate(keys)}, tokens=100, model="tiny")


def _anisotropic(d: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))[0]
    scales = torch.logspace(-2, 1, d, dtype=torch.float64)
    return (basis * scales) @ basis.T


def test_white_inputs_give_the_plain_compression(loras, tmp_path):
    white = _statistics(lambda d, i: torch.eye(d))
    plain = compress(list(loras.values()), tmp_path / "plain", rank=3, progress=False)
    calibrated = compress(list(loras.values()), tmp_path / "cal", rank=3, progress=False, calibration=white)
    for name in loras:
        for key in _module_keys():
            torch.testing.assert_close(sigma_delta(tmp_path / "cal", name, key),
                                       sigma_delta(tmp_path / "plain", name, key), atol=1e-5, rtol=1e-4)
            assert calibrated.adapters[name]["err2"][key] == pytest.approx(plain.adapters[name]["err2"][key],
                                                                           rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("method,budget", [("jd-full", None), ("jd-diag", None), ("jd-full", "5x")])
def test_calibration_minimises_and_reports_the_activation_error(loras, tmp_path, method, budget):
    statistics = _statistics(lambda d, i: _anisotropic(d, i).float())
    options = {"budget": budget} if budget else {"rank": 3}
    plain = compress(list(loras.values()), tmp_path / "plain", method=method, progress=False, **options)
    calibrated = compress(list(loras.values()), tmp_path / "cal", method=method, progress=False,
                          calibration=statistics, calibration_damping=0.0, **options)
    totals = {"plain": 0.0, "cal": 0.0}
    for name, path in loras.items():
        for key in _module_keys():
            moment = statistics.moments[statistics.groups[key]].double().numpy()
            delta = lora_delta(path, key).numpy()
            for label in totals:
                error = delta - sigma_delta(tmp_path / label, name, key).numpy()
                activation_err2 = np.trace(error @ moment @ error.T) / np.trace(delta @ moment @ delta.T)
                totals[label] += activation_err2
                if label == "cal":
                    reported = calibrated.adapters[name]["err2"][key]
                    assert reported == pytest.approx(activation_err2, rel=2e-3, abs=1e-6)
    assert totals["cal"] < totals["plain"]
    assert calibrated.data["settings"]["calibration"]["tokens"] == 100
    assert plain.data["settings"].get("calibration") is None


def test_collect_input_statistics_matches_hooked_inputs():
    model = tiny_llama().eval()
    batches = [{"input_ids": torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(s)),
                "attention_mask": torch.tensor([[1] * 7, [0, 0] + [1] * 5])} for s in range(2)]
    seen: dict[str, list[torch.Tensor]] = {}
    linears = target_linears(model)
    handles = [m.register_forward_pre_hook(lambda mod, inp, key=k: seen.setdefault(key, []).append(inp[0]))
               for k, m in linears.items()]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    statistics = collect_input_statistics(model, batches, TARGETS)
    assert statistics.tokens == 7 + 5 + 7 + 5
    for key in linears:
        rows = torch.cat([x[b.get("attention_mask").bool()] for x, b in zip(seen[key], batches)]).double()
        expected = rows.T @ rows / rows.shape[0]
        torch.testing.assert_close(statistics.moments[statistics.groups[key]].double(), expected, atol=1e-5,
                                   rtol=1e-4)
    # q, k and v of one layer read the same input: one shared moment.
    assert statistics.groups["model.layers.0.self_attn.q_proj"] == statistics.groups["model.layers.0.self_attn.v_proj"]


def test_statistics_file_roundtrip_and_add_on_a_calibrated_collection(loras, tmp_path):
    statistics = _statistics(lambda d, i: _anisotropic(d, i).float())
    path = statistics.save(tmp_path / "stats.safetensors")
    loaded = InputStatistics.load(path)
    assert loaded.fingerprint() == statistics.fingerprint()
    names = list(loras)
    compress([f"{n}={loras[n]}" for n in names[:4]], tmp_path / "cal", rank=3, progress=False, calibration=path)
    shutil.copytree(tmp_path / "cal", tmp_path / "ext")
    report = extend_collection(tmp_path / "ext", [f"{names[4]}={loras[names[4]]}"], progress=False)
    for key in _module_keys():
        delta = lora_delta(loras[names[4]], key)
        err2 = float((delta - sigma_delta(tmp_path / "ext", names[4], key)).norm() ** 2 / delta.norm() ** 2)
        assert report.adapters[names[4]]["err2"][key] == pytest.approx(err2, rel=2e-3, abs=1e-7)
        assert err2 < 1.0


def test_statistics_for_other_modules_are_refused(loras, tmp_path):
    statistics = InputStatistics({0: torch.eye(64)}, {"model.layers.0.self_attn.q_proj": 0}, tokens=1)
    with pytest.raises(UsageError, match="no inputs of module"):
        compress(list(loras.values()), tmp_path / "x", rank=2, progress=False, calibration=statistics)


def test_calibrate_command_writes_statistics_compress_uses(loras, tmp_path):
    from peft_jd.cli import main
    from peft_jd.zoo.model import char_tokenizer

    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    texts = tmp_path / "texts.txt"
    texts.write_text("Reverse the words: red fox\nWhat is 2 + 3?\n\nSpell 'cat' backwards.\n", encoding="utf-8")
    out = tmp_path / "stats.safetensors"
    assert main(["calibrate", "--model", str(model_dir), "--texts", str(texts), "--target-modules", *TARGETS,
                 "--out", str(out), "--batch-size", "2"]) == 0
    statistics = InputStatistics.load(out)
    assert set(statistics.groups) == set(_module_keys())
    assert statistics.tokens == sum(len(line) for line in texts.read_text().splitlines() if line)
    assert main(["compress", "--adapters", *map(str, loras.values()), "--out", str(tmp_path / "c"), "--rank", "2",
                 "--calibration", str(out), "--quiet"]) == 0
