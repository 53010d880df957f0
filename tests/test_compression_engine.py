"""End to end: PEFT LoRAs of a tiny model → `compress` → sigma adapters loaded with `PeftModel.from_pretrained`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from collection_fixtures import lora_delta, make_lora, sigma_delta
from peft import PeftModel
from safetensors.torch import load_file, save_file
from utils import TINY_NAME, target_linears, tiny_llama

import peft_jd  # noqa: F401  (registers JDLORA)
from peft_jd.compression import CompressionReport, compress, extend_collection
from peft_jd.compression import engine as engine_module
from peft_jd.core import AdapterFormatError, BaseModelMismatchError, DestinationError, ShapeMismatchError


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "a": make_lora(root / "a", r=4, alpha=8, seed=0),
        "b": make_lora(root / "b", r=8, alpha=16, seed=1, use_rslora=True),
        "c": make_lora(root / "c", r=2, alpha=4, seed=2, alpha_pattern={"v_proj": 12}),
        "d": make_lora(root / "d", r=4, alpha=4, seed=3),
        "e": make_lora(root / "e", r=6, alpha=6, seed=4),
    }


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def test_near_lossless_collection_matches_original_loras_through_peft(loras, tmp_path):
    names = ["a", "b", "c"]  # ranks 4 + 8 + 2 = 14 ≤ 32 (the GQA k/v width): JD-Full can be exact
    report = compress([f"{n}={loras[n]}" for n in names], tmp_path / "out", rank=14, progress=False)
    assert report.mean_err2 < 1e-9
    assert json.loads((tmp_path / "out" / "report.json").read_text())["summary"]["mean_err2"] == report.mean_err2
    for name in names:
        expected = _logits(PeftModel.from_pretrained(tiny_llama(), str(loras[name])), TOKENS)
        got = _logits(PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out" / "adapters" / name)), TOKENS)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,clusters", [("jd-full", 2), ("jd-diag", 1), ("svd", 1)])
def test_lossy_collection_forward_and_errors_match_dense_references(loras, tmp_path, method, clusters):
    report = compress(list(loras.values()), tmp_path / "out", method=method, rank=3, clusters=clusters,
                      progress=False)
    out = tmp_path / "out"
    base = tiny_llama()
    for name in loras:
        # Reference: the base model with W + ΔŴ merged densely, ΔŴ read back from the files.
        merged = copy.deepcopy(base)
        for module_key, linear in target_linears(merged).items():
            linear.weight.data += sigma_delta(out, name, module_key).float()
            delta = lora_delta(loras[name], module_key)
            err2 = float((delta - sigma_delta(out, name, module_key)).norm() ** 2 / delta.norm() ** 2)
            assert report.adapters[name]["err2"][module_key] == pytest.approx(err2, rel=1e-3, abs=1e-9)
        got = _logits(PeftModel.from_pretrained(copy.deepcopy(base), str(out / "adapters" / name)), TOKENS)
        torch.testing.assert_close(got, _logits(merged, TOKENS), atol=1e-4, rtol=1e-4)
    assert 0 < report.mean_err2 < 1
    if method == "svd":
        assert [report.adapters[n]["cluster"] for n in loras] == list(range(len(loras)))


def test_report_contents(loras, tmp_path):
    report = compress(list(loras.values()), tmp_path / "out", rank=4, clusters=2, progress=False)
    reloaded = CompressionReport.load(tmp_path / "out")
    assert reloaded.data == report.data
    assert set(report.adapters) == set(loras)
    entry = report.adapters["b"]
    assert entry["lora_params"] == 8 * (64 + 64) * 2 + 8 * (64 + 32) * 4  # q: 64→64, k/v: 64→32, 2 layers
    assert set(entry["err2"]) == set(target_linears(tiny_llama()))
    assert all(abs(entry["err"][k] ** 2 - v) < 1e-12 for k, v in entry["err2"].items())
    sizes = report.sizes
    assert sizes["sigma_params"] == len(loras) * 6 * 16
    assert sizes["compression_ratio"] == pytest.approx(sizes["lora_params"] / (sizes["bases_params"]
                                                                                + sizes["sigma_params"]))
    assert report.modules["model.layers.0.self_attn.k_proj"]["out_features"] == 32
    assert {"total_s", "read_s", "compress_s", "write_s"} <= set(report.timings)
    bases_config = json.loads((tmp_path / "out" / "bases" / "jd_bases_config.json").read_text())
    assert bases_config["method"] == "jd-full" and bases_config["base_model_name_or_path"] == TINY_NAME
    assert (tmp_path / "out" / "bases" / "README.md").is_file()


def test_bad_inputs_name_the_adapter_file(loras, tmp_path):
    other_base = make_lora(tmp_path / "other", base="other-model")
    with pytest.raises(BaseModelMismatchError, match="other"):
        compress([loras["a"], other_base], tmp_path / "o1", progress=False)
    fewer = make_lora(tmp_path / "fewer", targets=["q_proj", "v_proj"])
    with pytest.raises(ShapeMismatchError, match="fewer"):
        compress([loras["a"], fewer], tmp_path / "o2", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        compress([loras["a"], tmp_path / "empty"], tmp_path / "o3", progress=False)
    broken = make_lora(tmp_path / "nan", seed=5)
    tensors = load_file(broken / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("k_proj.lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match=r"nan.*NaN or inf|NaN or inf"):
        compress([loras["a"], broken], tmp_path / "o4", progress=False)
    wide = make_lora(tmp_path / "wide", r=40)  # rank 40 > the 32 outputs of k_proj/v_proj
    with pytest.raises(ShapeMismatchError, match="wide.*rank 40"):
        compress([loras["a"], wide], tmp_path / "o5", progress=False)
    with pytest.raises(ValueError, match="rank 33"):
        compress([loras["a"]], tmp_path / "o6", rank=33, progress=False)
    dora = make_lora(tmp_path / "dora", use_dora=True)
    with pytest.raises(AdapterFormatError, match="dora.*DoRA"):
        compress([loras["a"], dora], tmp_path / "o7", progress=False)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(DestinationError, match="not written by peft-jd"):
        compress([loras["a"]], tmp_path / "precious", progress=False)
    assert not any(p.name.startswith("o") and p.is_dir() and (p / "report.json").exists() for p in tmp_path.iterdir())


def test_interrupt_then_resume_gives_the_uninterrupted_result(loras, tmp_path, monkeypatch):
    specs = list(loras.values())
    reference = compress(specs, tmp_path / "reference", rank=3, clusters=2, progress=False)
    real = engine_module.compress_stack
    calls, interrupt = [], [True]

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 and interrupt.pop() if interrupt else False:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "compress_stack", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compress(specs, tmp_path / "out", rank=3, clusters=2, progress=False)
    assert not (tmp_path / "out").exists()
    work = tmp_path / ".out.peft-jd-work" / "modules"
    assert len(list(work.glob("*.safetensors"))) == 2
    calls.clear()
    report = compress(specs, tmp_path / "out", rank=3, clusters=2, progress=False)
    assert len(calls) == 6 - 2  # finished modules are not redone
    assert not work.parent.exists()
    assert report.adapters == reference.adapters
    assert (tmp_path / "out" / "bases" / "jd_bases.safetensors").read_bytes() == (
        tmp_path / "reference" / "bases" / "jd_bases.safetensors").read_bytes()
    # Other settings discard the stale state instead of mixing it in.
    calls.clear()
    compress(specs, tmp_path / "out", rank=2, progress=False)
    assert len(calls) == 6


def test_add_projects_new_loras_and_leaves_the_collection_untouched(loras, tmp_path):
    out = tmp_path / "out"
    compress([loras[n] for n in "abcd"], out, rank=4, clusters=2, progress=False)
    before = {p: p.read_bytes() for p in (out / "bases").iterdir()}
    before.update({p: p.read_bytes() for p in (out / "adapters").rglob("*") if p.is_file()})
    original = CompressionReport.load(out)
    with pytest.warns(UserWarning, match="'e'.*Re-compressing the collection"):
        report = extend_collection(out, [f"a_again={loras['a']}", loras["e"]], warn_error=0.5, progress=False)
    assert all(p.read_bytes() == content for p, content in before.items())
    assert report.adapters["a_again"]["added"] and report.adapters["e"]["added"]
    # Projecting a LoRA that is already in the collection reproduces its Σ, cluster and error.
    assert report.adapters["a_again"]["cluster"] == original.adapters["a"]["cluster"]
    for module_key, value in original.adapters["a"]["err2"].items():
        assert report.adapters["a_again"]["err2"][module_key] == pytest.approx(value, rel=1e-3, abs=1e-9)
    assert len(report.warnings) == 1 and "'e'" in report.warnings[0]  # a random LoRA is far from the bases
    assert CompressionReport.load(out).data["num_adapters"] == 6
    for module_key in target_linears(tiny_llama()):
        delta = lora_delta(loras["e"], module_key)
        err2 = float((delta - sigma_delta(out, "e", module_key)).norm() ** 2 / delta.norm() ** 2)
        assert report.adapters["e"]["err2"][module_key] == pytest.approx(err2, rel=1e-3, abs=1e-9)
    model = PeftModel.from_pretrained(tiny_llama(), str(out / "adapters" / "e"))
    model.load_adapter(str(out / "adapters" / "a"), adapter_name="a")
    with pytest.raises(DestinationError, match="already exist"):
        extend_collection(out, [loras["e"]], progress=False)


def test_target_error_picks_rank_and_records_the_choice(loras, tmp_path):
    loose = compress(list(loras.values()), tmp_path / "loose", target_error=0.5, clusters=1, progress=False)
    tight = compress(list(loras.values()), tmp_path / "tight", target_error=0.02, clusters=1, progress=False)
    for report in (loose, tight):
        selection = report.data["auto_selection"]
        assert selection["met"] and selection["probe_err2"] <= selection["target_error"]
        assert report.rank == selection["rank"]
        smaller = [t for t in selection["tried"] if t["rank"] < report.rank]
        assert all(t["err2"] > selection["target_error"] for t in smaller)
    assert tight.rank > loose.rank


def test_hub_ids_honour_revision_token_and_cache(loras, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, subfolder=None, revision=None, token=None, cache_dir=None,
                      local_files_only=False):
        calls.append((repo_id, filename, subfolder, revision, token, cache_dir, local_files_only))
        return str(loras["a" if subfolder is None else "b"] / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    listing = tmp_path / "adapters.txt"
    listing.write_text("# Hub adapters\norg/lora-a@v1.0\nbee=org/collection/loras/b   # a subfolder\n")
    report = compress([listing], tmp_path / "out", rank=4, revision="main", token="hf_x", cache_dir="/cache",
                      progress=False)
    assert set(report.adapters) == {"lora-a", "bee"}
    assert ("org/lora-a", "adapter_model.safetensors", None, "v1.0", "hf_x", "/cache", False) in calls
    assert ("org/collection", "adapter_config.json", "loras/b", "main", "hf_x", "/cache", False) in calls
    with pytest.raises(FileNotFoundError, match="not-a-dir"):
        compress(["not-a-dir"], tmp_path / "o2", progress=False)


def test_add_to_a_diagonal_collection_reproduces_the_least_squares_sigma(loras, tmp_path):
    out = tmp_path / "out"
    original = compress([loras[n] for n in "abc"], out, method="jd-diag", rank=3, progress=False)
    report = extend_collection(out, [f"b_again={loras['b']}"], warn_error=1.0, progress=False)
    for module_key, value in original.adapters["b"]["err2"].items():
        assert report.adapters["b_again"]["err2"][module_key] == pytest.approx(value, rel=1e-3, abs=1e-9)
    sigma = load_file(out / "adapters" / "b_again" / "adapter_model.safetensors")
    assert all(t.shape == (3,) for t in sigma.values())


def test_local_path_as_base_model_only_warns_but_two_model_ids_fail(loras, tmp_path):
    # The same model, recorded once by id and once by the folder it was loaded from (as the zoo's older cache did).
    from_folder = make_lora(tmp_path / "from-folder", seed=3, base=str(tmp_path / "models" / "tiny"))
    with pytest.warns(UserWarning, match="one is a local path"):
        report = compress([loras["a"], from_folder], tmp_path / "o1", rank=8, progress=False)
    assert len(report.adapters) == 2
    other_id = make_lora(tmp_path / "other-id", seed=4, base="org/another-model")
    with pytest.raises(BaseModelMismatchError, match="other-id"):
        compress([loras["a"], other_id], tmp_path / "o2", progress=False)
