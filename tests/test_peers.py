"""benchmarks/peer_compress.py: the public peers (lorashare, vlora-dev) at a byte budget, written back as PEFT LoRAs.

The peers live only in the benchmark's own venv (`bash benchmarks/peers_env.sh`); the tests that run them are skipped
without it (CI does not create it). The budget arithmetic and the error measure run everywhere.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import peer_compress
import pytest
import torch
from collection_fixtures import lora_delta, make_lora
from peft import PeftModel
from safetensors.torch import load_file
from utils import tiny_llama


ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv-peers" / "bin" / "python"
needs_venv = pytest.mark.skipif(
    not PYTHON.exists(), reason="no peers' venv (.venv-peers): create it with `bash benchmarks/peers_env.sh`"
)
pytestmark = pytest.mark.usefixtures("single_thread")


def test_relative_error_from_factors_matches_the_dense_error():
    gen = np.random.default_rng(0)
    a, b = gen.normal(size=(4, 12)), gen.normal(size=(10, 4))
    a2, b2 = a + 0.1 * gen.normal(size=a.shape), b + 0.1 * gen.normal(size=b.shape)
    dense = np.linalg.norm(b @ a - b2 @ a2) ** 2 / np.linalg.norm(b @ a) ** 2
    pair = (torch.tensor(a), torch.tensor(b)), (torch.tensor(a2), torch.tensor(b2))
    assert peer_compress.relative_error2(*pair) == pytest.approx(dense, rel=1e-9)
    assert peer_compress.relative_error2(pair[0], pair[0]) == pytest.approx(0.0, abs=1e-12)


def test_the_largest_fitting_setting_is_chosen():
    # Two modules, r = 2: (in, out) = (6, 4) and (6, 6); 4 adapters.
    shapes = peer_compress.Shapes({"m1": (2, 6, 4), "m2": (2, 6, 6)}, n=4)
    # lorashare at k: 2·k·r per module and side pair own, k·(in + out) per module shared.
    lorashare = {k: 2 * (2 * k * 2 * 2 + k * (10 + 12) / 4) for k in range(1, 5)}
    assert peer_compress.choose_k(peer_compress.PEERS["lorashare"], shapes, lorashare[3], 2) == 3
    assert peer_compress.choose_k(peer_compress.PEERS["lorashare"], shapes, lorashare[3] - 1, 2) == 2
    assert peer_compress.choose_k(peer_compress.PEERS["lorashare"], shapes, 1e12, 2) == 4  # its clamp: min(in, out)
    assert peer_compress.choose_k(peer_compress.PEERS["lorashare"], shapes, lorashare[1] - 1, 2) is None
    # vlora at k: k per module and side own; (k + 1)·r·(in + out) per module shared (basis rows and the mean).
    vlora = {k: 4 * (2 * k * 2 + (k + 1) * 2 * 22 / 4) for k in range(0, 4)}
    assert peer_compress.choose_k(peer_compress.PEERS["vlora"], shapes, vlora[1], 4) == 1
    assert peer_compress.choose_k(peer_compress.PEERS["vlora"], shapes, 1e12, 4) == 3  # n − 1 with the mean
    assert peer_compress.choose_k(peer_compress.PEERS["vlora"], shapes, vlora[0] - 1, 4) is None


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peer-loras")
    return {f"task-{i}": make_lora(root / f"lora-{i}", seed=i) for i in range(3)}


def _modules(path: Path) -> dict[str, tuple[int, int, int]]:
    """Module key → (r, in, out) of a LoRA, from its file."""
    tensors = load_file(str(path / "adapter_model.safetensors"))
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    return {
        key[len(prefix) : -len(suffix)]: (t.shape[0], t.shape[1], tensors[key.replace("lora_A", "lora_B")].shape[0])
        for key, t in tensors.items()
        if key.endswith(suffix)
    }


def _run(method: str, loras: dict[str, Path], budget: float, out: Path, *extra: str) -> subprocess.CompletedProcess:
    adapters = [f"{name}={path}" for name, path in loras.items()]
    command = [str(PYTHON), str(ROOT / "benchmarks" / "peer_compress.py"), "--method", method]
    command += ["--budget-bytes", str(budget), "--out", str(out), *extra, "--adapters", *adapters]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT)


def _hand_bytes(method: str, k: int, modules: dict[str, tuple[int, int, int]], n: int) -> float:
    """Bytes per adapter at fp16 as the peer stores it, counted by hand from the module shapes."""
    if method == "lorashare":
        own, shared = sum(2 * k * r for r, _, _ in modules.values()), sum(k * (i + o) for _, i, o in modules.values())
    else:
        own, shared = 2 * k * len(modules), sum((k + 1) * r * (i + o) for r, i, o in modules.values())
    return 2 * (own + shared / n)


@needs_venv
@pytest.mark.parametrize(("method", "ratio"), [("lorashare", 4.0), ("vlora", 4 / 3)])
def test_peer_reconstructions_load_with_peft_within_the_budget(loras, tmp_path, method, ratio):
    modules = _modules(next(iter(loras.values())))
    lora_bytes = 2 * sum(r * (i + o) for r, i, o in modules.values())
    budget = lora_bytes / ratio
    done = _run(method, loras, budget, tmp_path / "out")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "peer_report.json").read_text())
    k = report["setting"]["num_components"]
    assert k >= 1 and report["bytes_per_adapter"] == pytest.approx(_hand_bytes(method, k, modules, 3))
    assert report["bytes_per_adapter"] <= budget < _hand_bytes(method, k + 1, modules, 3)
    for name, source in loras.items():
        folder = tmp_path / "out" / name
        original, written = (json.loads((p / "adapter_config.json").read_text()) for p in (source, folder))
        assert written == original  # same r, lora_alpha and target modules
        model = PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        for key in modules:
            layer = model.get_submodule(f"base_model.model.{key}")
            assert torch.equal(layer.lora_A["default"].weight, tensors[f"base_model.model.{key}.lora_A.weight"])
            exact, approx = lora_delta(source, key), lora_delta(folder, key)
            err2 = float((exact - approx).norm() ** 2 / exact.norm() ** 2)
            assert report["err2"][name][key] == pytest.approx(err2, rel=1e-6, abs=1e-9)
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@needs_venv
def test_vlora_at_its_largest_setting_is_lossless_with_the_lora_scaling(loras, tmp_path):
    done = _run("vlora", loras, 1e12, tmp_path / "out", "--value-dtype", "float32")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "peer_report.json").read_text())
    assert report["setting"] == {"num_components": 2} and report["value_dtype"] == "float32"
    for name, source in loras.items():
        for key in _modules(source):
            exact, approx = lora_delta(source, key), lora_delta(tmp_path / "out" / name, key)
            torch.testing.assert_close(approx, exact, rtol=1e-4, atol=1e-5)


@needs_venv
def test_no_fitting_setting_exits_3_and_writes_nothing(loras, tmp_path):
    done = _run("vlora", loras, 100, tmp_path / "out")
    assert done.returncode == peer_compress.NO_FIT_STATUS and "no setting fits 100 bytes" in done.stderr
    assert not (tmp_path / "out").exists()


def test_outputs_never_leave_out_nor_replace_a_foreign_folder(tmp_path):
    lora = make_lora(tmp_path / "lora", r=2, alpha=4, seed=0)
    factors = {"model.layers.0.self_attn.q_proj": (torch.zeros(2, 64), torch.zeros(64, 2))}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    result = peer_compress.Compressed({"a": factors}, {"a": 1}, 0)
    with pytest.raises(SystemExit, match="not written by peer_compress"):
        peer_compress.write_outputs(foreign, {"a": lora}, result, {})
    assert (foreign / "keep.txt").read_text() == "user data"
    for hostile in ("../escape", "..", "a/b", ""):
        hostile_result = peer_compress.Compressed({hostile: factors}, {hostile: 1}, 0)
        with pytest.raises(SystemExit, match="cannot be a folder name"):
            peer_compress.write_outputs(tmp_path / "out", {hostile: lora}, hostile_result, {})
    assert not (tmp_path / "escape").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    peer_compress.write_outputs(tmp_path / "out", {"a": lora}, result, {})
    peer_compress.write_outputs(tmp_path / "out", {"a": lora}, result, {})  # its own output is replaced
    assert (tmp_path / "out" / "a" / "adapter_config.json").is_file()
