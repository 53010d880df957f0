"""`compress` / `add` never destroy or corrupt: refusals of foreign folders (issue 12 case 3), locks (4), clear
errors for bad inputs (7), leftovers and modes (8), adapters added with `add` (9), and `modules_to_save` carried
through compression (issue 11)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
import torch
from collection_fixtures import BASE_MODEL, MODULES, check_consistent, sha256, snapshot, write_lora
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from utils import TARGETS, tiny_llama

from peft_jd.cli import main as cli_main
from peft_jd.compression import CompressionReport, compress, extend_collection
from peft_jd.compression.cards import TAGS
from peft_jd.core import (
    AdapterFormatError,
    AdapterSpec,
    DestinationError,
    JDLoraError,
    UsageError,
    read_adapter_tensors,
    read_marker,
)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {name: write_lora(root / name, seed=i, r=2 + i % 2) for i, name in enumerate("abcdefg")}


def _compress(paths, out, **kwargs):
    return compress([str(p) for p in paths], out, rank=2, progress=False, **kwargs)


# --------------------------------------------------------------------------------------------- case 3: overwrite
def test_compress_refuses_a_folder_it_did_not_write(loras, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"adapters": {}}))  # a report.json of something else
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DestinationError, match="not written by peft-jd.*--overwrite"):
        _compress([loras["a"], loras["b"]], out)
    assert (out / "notes.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == [
        "notes.txt", "report.json"]
    assert cli_main(["compress", "--adapters", str(loras["a"]), "--out", str(out), "--rank", "2", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and "Traceback" not in err
    assert (out / "notes.txt").is_file()
    assert cli_main(["compress", "--adapters", str(loras["a"]), "--out", str(out), "--rank", "2", "--quiet",
                     "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and read_marker(out) == "collection"
    # A peft-jd collection is replaced without --overwrite; a file in place of the folder never.
    report = _compress([loras["b"], loras["c"]], out)
    assert set(CompressionReport.load(out).adapters) == {"b", "c"} == set(report.adapters)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DestinationError, match="not a folder"):
        _compress([loras["a"]], tmp_path / "file", overwrite=True)


# ----------------------------------------------------------------------------------- case 9: adapters from `add`
def test_recompress_refuses_to_drop_adapters_added_later(loras, tmp_path):
    out = tmp_path / "col"
    _compress([loras["a"], loras["b"], loras["c"]], out)
    extend_collection(out, [str(loras["d"]), f"extra={loras['e']}"], warn_error=1.0, progress=False)
    before = snapshot(out)
    with pytest.raises(DestinationError, match=r"1 adapter\(s\) added with `peft-jd add`.*: extra\..*--overwrite"):
        _compress([loras["a"], loras["b"], loras["d"]], out)  # d is kept as an input, `extra` would be dropped
    assert snapshot(out) == before
    # Listing them (under the same names) recompresses them jointly; --overwrite drops them.
    report = _compress([loras["a"], loras["b"], loras["c"], loras["d"], f"extra={loras['e']}"], out)
    assert not report.added_adapters() and len(report.adapters) == 5
    extend_collection(out, [str(loras["f"])], warn_error=1.0, progress=False)
    report = _compress([loras["a"], loras["b"]], out, overwrite=True)
    assert set(report.adapters) == {"a", "b"} == {p.name for p in (out / "adapters").iterdir()}


# ------------------------------------------------------------------------------------------------ case 4: locks
_RUN = """
import os, sys, time, warnings
warnings.simplefilter("ignore")
from peft_jd.compression import compress, extend_collection
command, out, barrier, *adapters = sys.argv[1:]
open(f"{barrier}.{os.getpid()}", "w").close()
while not os.path.exists(barrier):  # start together, after the slow imports
    time.sleep(0.01)
if command == "compress":
    compress(adapters, out, rank=2, clusters=2, progress=False)
else:
    extend_collection(out, adapters, warn_error=10.0, progress=False)
"""


def _run_concurrently(tmp_path: Path, *argvs: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    barrier = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _RUN, argv[0], argv[1], str(barrier), *argv[2:]], env=env,
                              stderr=subprocess.PIPE, text=True) for argv in argvs]
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob("go.*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    barrier.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err


def test_concurrent_compress_runs_never_mix_bases_and_sigma(loras, tmp_path):
    out = tmp_path / "shared"
    first, second = [loras[n] for n in "abc"], [loras[n] for n in "def"]  # same shapes, other adapters
    _run_concurrently(tmp_path, ["compress", str(out), *map(str, first)], ["compress", str(out), *map(str, second)])
    names = check_consistent(out, loras)
    assert names in ({"a", "b", "c"}, {"d", "e", "f"})


def test_concurrent_adds_keep_every_entry(loras, tmp_path):
    out = tmp_path / "shared"
    _compress([loras["a"], loras["b"]], out)
    _run_concurrently(tmp_path, ["add", str(out), str(loras["c"]), str(loras["d"])],
                      ["add", str(out), str(loras["e"]), str(loras["f"])])
    assert check_consistent(out, loras) == set("abcdef")
    assert CompressionReport.load(out).added_adapters() == list("cdef")


# ------------------------------------------------------------------------------------------ case 7: bad inputs
def _bad_lora(tmp_path: Path, name: str, config=None, config_bytes: bytes | None = None, tensors=None) -> Path:
    path = write_lora(tmp_path / name, seed=9)
    if config is not None:
        (path / "adapter_config.json").write_text(json.dumps(config))
    if config_bytes is not None:
        (path / "adapter_config.json").write_bytes(config_bytes)
    if tensors is not None:
        save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_bad_inputs_raise_typed_errors_naming_the_file(loras, tmp_path, capsys):
    key = next(iter(MODULES))
    good = load_file(str(loras["a"] / "adapter_model.safetensors"))
    one_d = dict(good, **{f"base_model.model.{key}.lora_A.weight": torch.ones(16)})
    three_d = dict(good, **{f"base_model.model.{key}.lora_B.weight": torch.ones(16, 2, 1)})
    config = json.loads((loras["a"] / "adapter_config.json").read_text())
    cases = {
        "list-config": ([1, 2], None, None, "must hold a JSON object"),
        "binary-config": (None, b"\xff\xfe\x00\x81", None, "not valid JSON"),
        "one-d": (None, None, one_d, "2-D"),
        "three-d": (None, None, three_d, "2-D"),
        "pattern": (dict(config, rank_pattern=[1]), None, None, "rank_pattern"),
        "alpha": (dict(config, lora_alpha="big"), None, None, "lora_alpha"),
        "saved-names": (dict(config, modules_to_save=[3]), None, None, "modules_to_save"),
    }
    for name, (bad_config, raw, tensors, message) in cases.items():
        path = _bad_lora(tmp_path, name, bad_config, raw, tensors)
        with pytest.raises(AdapterFormatError, match=message) as info:
            _compress([loras["b"], path], tmp_path / f"out-{name}")
        assert str(path) in str(info.value), name
        assert cli_main(["compress", "--adapters", str(loras["b"]), str(path), "--out", str(tmp_path / "o"),
                         "--quiet"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "internal error" not in err and str(path) in err, name
    empty_list = tmp_path / "empty.txt"
    empty_list.write_text("# nothing here\n")
    with pytest.raises(AdapterFormatError, match="lists no adapters"):
        _compress([empty_list], tmp_path / "o")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(AdapterFormatError, match="not UTF-8"):
        _compress([tmp_path / "binary.txt"], tmp_path / "o")
    with pytest.raises(UsageError, match="no adapters given"):
        compress([], tmp_path / "o", progress=False)
    # A collection whose report.json is not a report: `add` and `inspect` name it.
    out = tmp_path / "col"
    _compress([loras["a"], loras["b"]], out)
    (out / "report.json").write_text("[]")
    with pytest.raises(AdapterFormatError, match="report.json must hold a JSON object"):
        extend_collection(out, [str(loras["c"])], progress=False)
    assert cli_main(["inspect", str(out)]) == 1 and "report.json" in capsys.readouterr().err
    with pytest.raises(JDLoraError, match="not a peft-jd collection"):
        extend_collection(tmp_path / "nowhere", [str(loras["c"])], progress=False)


# ---------------------------------------------------------------------------------------- case 8: leftovers, modes
def test_leftovers_are_cleaned_and_files_get_the_usual_modes(loras, tmp_path):
    old_umask = os.umask(0o022)
    try:
        out = tmp_path / "col"
        _compress([loras["a"], loras["b"]], out)
        stale_tmp, stale_trash = tmp_path / ".tmp-col-dead1234", tmp_path / ".trash-col-dead5678"
        for stale in (stale_tmp, stale_trash):
            (stale / "bases").mkdir(parents=True)
            (stale / "bases" / "jd_bases.safetensors").write_bytes(b"0" * 1000)
        work_tmp = tmp_path / ".col.peft-jd-work" / "modules" / ".tmp-00000-x.safetensors-abc"
        work_tmp.parent.mkdir(parents=True)
        work_tmp.write_bytes(b"half")
        _compress([loras["a"], loras["c"]], out)
        assert not stale_tmp.exists() and not stale_trash.exists() and not work_tmp.parent.parent.exists()
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
        assert leftovers == []
        for path in [out, *out.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
        # A crash between the two renames of a swap (no RENAME_EXCHANGE) left only the old copy: `add` restores it.
        os.replace(out, tmp_path / ".trash-col-0badc0de")
        extend_collection(out, [str(loras["d"])], warn_error=1.0, progress=False)
        assert set(CompressionReport.load(out).adapters) == {"a", "c", "d"}
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".trash-"))] == []
        assert stat.S_IMODE((out / "adapters" / "d" / "adapter_model.safetensors").stat().st_mode) == 0o644
    finally:
        os.umask(old_umask)


def test_add_rerun_after_an_orphaned_adapter_folder_works(loras, tmp_path):
    out = tmp_path / "col"
    _compress([loras["a"], loras["b"]], out)
    # What a killed pre-lock `add` left: an adapter folder the report does not list.
    (out / "adapters" / "c").mkdir()
    (out / "adapters" / "c" / "adapter_config.json").write_text("{}")
    report = extend_collection(out, [str(loras["c"])], warn_error=1.0, progress=False)
    assert "c" in report.adapters and check_consistent(out, loras) == {"a", "b", "c"}


# --------------------------------------------------------------------------------------------- modules_to_save
def test_modules_to_save_are_kept_per_adapter_uncompressed(loras, tmp_path):
    gen = torch.Generator().manual_seed(0)
    heads = {name: {"score": {"weight": torch.randn(3, 16, generator=gen), "bias": torch.randn(3, generator=gen)}}
             for name in ("h1", "h2", "h3")}
    paths = {name: write_lora(tmp_path / name, seed=20 + i, modules_to_save=heads[name])
             for i, name in enumerate(heads)}
    out = tmp_path / "col"
    report = _compress([paths["h1"], paths["h2"], loras["a"]], out)
    extend_collection(out, [str(paths["h3"])], warn_error=1.0, progress=False)
    report = CompressionReport.load(out)
    for name in heads:
        folder = out / "adapters" / name
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["modules_to_save"] == ["score"]
        stored = load_file(str(folder / "adapter_model.safetensors"))
        for param, tensor in heads[name]["score"].items():
            assert torch.equal(stored[f"base_model.model.score.{param}"], tensor)
        spec = AdapterSpec.from_directory(folder, name=name)
        sigmas, saved = read_adapter_tensors(spec, str(folder / "adapter_model.safetensors"))
        assert set(sigmas) == set(MODULES) and set(saved) == {"base_model.model.score.weight",
                                                               "base_model.model.score.bias"}
        assert report.adapters[name]["saved_params"] == 3 * 16 + 3
    assert report.adapters["a"]["saved_params"] == 0
    assert json.loads((out / "adapters" / "a" / "adapter_config.json").read_text()).get("modules_to_save") is None
    sizes = report.sizes
    assert sizes["saved_params"] == 3 * (3 * 16 + 3)
    assert sizes["total_ratio"] == pytest.approx((sizes["lora_params"] + sizes["saved_params"]) / (
        sizes["bases_params"] + sizes["sigma_params"] + sizes["saved_params"]))
    check_consistent(out, {**loras, **paths})


def test_modules_to_save_of_a_peft_saved_lora(tmp_path):
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=TARGETS,
                                                              modules_to_save=["lm_head"]))
    model.save_pretrained(tmp_path / "peft-lora")
    config_path = tmp_path / "peft-lora" / "adapter_config.json"
    config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()), base_model_name_or_path=BASE_MODEL)))
    head = model.base_model.model.lm_head.modules_to_save["default"].weight.detach()
    report = compress([str(tmp_path / "peft-lora")], tmp_path / "col", rank=2, progress=False)
    stored = load_file(str(tmp_path / "col" / "adapters" / "peft-lora" / "adapter_model.safetensors"))
    assert torch.equal(stored["base_model.model.lm_head.weight"], head)
    assert report.adapters["peft-lora"]["saved_params"] == head.numel()
    assert sha256(tmp_path / "col" / "bases" / "jd_bases.safetensors") == report.data["bases_fingerprint"]


def test_compress_writes_the_same_cards_as_push(loras, tmp_path):
    out = tmp_path / "col"
    _compress([loras["a"], loras["b"]], out)
    extend_collection(out, [str(loras["c"])], warn_error=1.0, progress=False)
    for card_path in (out / "bases" / "README.md", out / "adapters" / "a" / "README.md",
                      out / "adapters" / "c" / "README.md"):
        card = ModelCard(card_path.read_text())
        assert card.data.tags == TAGS and card.data.library_name == "peft" and card.data.base_model == BASE_MODEL
    assert "projected onto the existing bases" in (out / "adapters" / "c" / "README.md").read_text()
    assert "mean_err2" in (out / "adapters" / "a" / "README.md").read_text()
