"""`benchmarks/gpu_check.py` on the CPU: arguments, sweep variants, the CPU fallback, the kernels' import without
peft/transformers, and the test runner it uses on a GPU."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    return importlib.import_module("gpu_check")  # benchmarks/ is on pytest's pythonpath


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


# -- the optional vLLM step: benchmarks/gpu_vllm_check.py and its place in gpu_check.sh ----------------------------

@pytest.fixture(scope="module")
def vllm_check():
    return importlib.import_module("gpu_vllm_check")


def test_gpu_vllm_check_arguments(vllm_check):
    args = vllm_check.parse_args([])
    assert (args.adapters, args.requests, args.concurrency, args.max_tokens) == (100, 256, 64, 32)
    assert args.device is None and args.dtype is None and args.hidden % 64 == 0 and args.time_budget <= 300
    args = vllm_check.parse_args(["--device", "cpu", "--adapters", "3", "--dtype", "float16", "--hidden", "128"])
    assert (args.device, args.adapters, args.dtype, args.hidden) == ("cpu", 3, "float16", 128)
    for bad in (["--adapters", "0"], ["--hidden", "100"], ["--device", "tpu"], ["--gpu-memory-utilization", "2"]):
        with pytest.raises(SystemExit):
            vllm_check.parse_args(bad)


def test_gpu_vllm_check_skips_without_vllm(vllm_check, tmp_path, monkeypatch, capsys):
    # An interpreter whose `import vllm` fails, whatever is installed here.
    (tmp_path / "stub").mkdir()
    (tmp_path / "stub" / "vllm.py").write_text("raise ImportError('no vLLM in this image')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "stub"))
    assert vllm_check.vllm_version() is None
    out = tmp_path / "report" / "gpu_vllm_check.json"
    assert vllm_check.main(["--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == "vLLM not installed: skipped"
    report = json.loads(out.read_text())
    assert report["status"] == "skipped" and report["reason"] == "vLLM not installed: skipped"
    (tmp_path / "stub" / "vllm.py").write_text("__version__ = '9.9.9'\n")
    assert vllm_check.vllm_version() == "9.9.9"


def test_gpu_vllm_check_plugin_entry_point_without_install(vllm_check, tmp_path, monkeypatch):
    """Where peft-jd is not installed, a temporary dist-info on PYTHONPATH declares the plugin to vLLM."""
    monkeypatch.setattr(vllm_check.importlib.metadata, "entry_points", lambda group: [])
    pythonpath = vllm_check.plugin_pythonpath(tmp_path)
    assert pythonpath.split(os.pathsep)[:2] == [str(tmp_path / "plugin"), str(ROOT)]
    # The distribution named here exists only through the temporary dist-info (this environment may have peft-jd).
    code = ("import importlib.metadata as m; d = m.distribution('peft-jd-checkout'); "
            "print([e.value for e in d.entry_points if (e.group, e.name) == ('vllm.general_plugins', 'jd_lora')])")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": pythonpath},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['vllm_jd.plugin:register']"


def test_gpu_vllm_check_http_client(vllm_check):
    """The plain-HTTP client (no openai package): greedy, ignore_eos, and the burst's counts."""
    import http.server
    import threading

    bodies = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            payload = json.dumps({"choices": [{"text": "ab"}], "usage": {"completion_tokens": 2}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = vllm_check.Client(f"http://127.0.0.1:{server.server_address[1]}", timeout=30)
        client.openai, client.kind = None, "http"
        assert client.complete("task-1", "hi", 2) == ("ab", 2)
        result = client.burst([("base", "x")] * 5, 2, 3)
    finally:
        server.shutdown()
    assert result["requests"] == 5 and result["req_per_s"] > 0 and result["output_tok_per_s"] > 0
    assert bodies[0] == {"model": "task-1", "prompt": "hi", "max_tokens": 2, "temperature": 0.0, "ignore_eos": True}
    assert len(bodies) == 6


@pytest.mark.parametrize("kernel_rc, vllm_step, want_rc", [(0, "1", 0), (1, "1", 1), (0, "0", 0)])
def test_gpu_check_sh_keeps_exit_status(tmp_path, kernel_rc, vllm_step, want_rc):
    """gpu_check.sh: the vLLM step runs after the kernel step, with its own output, and never changes the status."""
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f"#!/usr/bin/env bash\necho \"$@\" >> {calls}\n"
                    f"case \"$1\" in *gpu_check.py) exit {kernel_rc};; *) exit 1;; esac\n")
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "OUT": str(tmp_path / "out"), "GPU_VLLM_CHECK": vllm_step}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--quick"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == want_rc, proc.stderr
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("benchmarks/gpu_check.py --out") and lines[0].endswith("--quick")
    if vllm_step == "0":
        assert len(lines) == 1
    else:
        assert lines[1] == f"benchmarks/gpu_vllm_check.py --time-budget 270 --out {tmp_path}/out/gpu_vllm_check.json"
        assert "vLLM step: exit status 1" in proc.stderr
