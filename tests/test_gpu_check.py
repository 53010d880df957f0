"""`benchmarks/gpu_check.py` on the CPU: arguments, sweep variants, the CPU fallback, the kernels' import without
peft/transformers, and the test runner it uses on a GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_arguments(gpu_check):
    args = gpu_check.parse_args([])
    assert args.tokens == [1, 16, 64, 256, 1024, 4096] and args.ranks == [16, 64] and args.clusters == [1, 25]
    assert args.out_features == [1024, 4096] and args.in_features == 4096 and args.adapters == 1000
    quick = gpu_check.parse_args(["--quick", "--tokens", "3"])
    assert quick.tokens == [3] and quick.ranks == [16] and quick.out_features == [1024]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--tokens", "0"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--dtype", "fp8"])


def test_gpu_check_sweep_variants(gpu_check):
    from peft_jd.kernels.triton_ops import default_launch_config

    config = default_launch_config(16, 4096, 1024, 64, 25, torch.device("cpu"))
    variants = gpu_check.sweep_variants(config)
    assert variants[0] == {} and {"sort_rows": not config.sort_rows} in variants
    for change in variants[1:]:
        (name, value), = change.items()
        assert getattr(config, name) != value, f"{change} repeats the default"
    assert len({tuple(sorted(c.items())) for c in variants}) == len(variants)


def test_gpu_check_cpu_fallback(gpu_check, tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = ["--device", "cpu", "--in-features", "40", "--out-features", "24", "--tokens", "1", "33", "--ranks", "4",
            "--clusters", "1", "3", "--adapters", "10", "--dtype", "fp32", "--out", str(out)]
    assert gpu_check.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads(out.read_text())
    assert printed["results"] == report["results"] and report["environment"]["device"] == "cpu"
    assert "skipped" in report["tests"] and report["benchmark_info"]["cases_planned"] == 4
    assert [(r["T"], r["clusters"]) for r in report["results"]] == [(1, 1), (33, 1), (1, 3), (33, 3)]
    for rec in report["results"]:
        assert rec["single_lora_ms"] > 0 and rec["torch_ms"] > 0 and "triton_ms" not in rec and "errors" not in rec


def test_gpu_check_kernels_import_without_peft(gpu_check):
    # The GPU image has other peft/transformers versions: the kernels must import without them (no package stub).
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('peft', 'transformers'): raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.path.insert(0, 'benchmarks'); import gpu_check; k, how = gpu_check.import_kernels(); import torch; "
        "assert how == 'package', how; "
        "assert 'peft' not in sys.modules and 'transformers' not in sys.modules; "
        "y = torch.zeros(2, 3); sigma = torch.cat([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)]); "
        "k.jd_lora_apply(y, torch.ones(2, 4), torch.ones(1, 3, 2), torch.ones(1, 4, 2), sigma, torch.tensor([1, 0]), "
        "torch.zeros(2, dtype=torch.long)); "
        "assert y[0].tolist() == [16.0] * 3 and y[1].tolist() == [0.0] * 3"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_gpu_check_test_runner(gpu_check):
    # The runner's subprocess, plugin (-p gpu_check) and summary parsing, on one fast test of this file.
    result = gpu_check.run_tests(180, ("tests/test_kernels_torch.py", "-k", "test_select_backend_env"), workers=0)
    assert result["returncode"] == 0 and not result["timed_out"], result["log_tail"]
    assert "1 passed" in result["summary"]
