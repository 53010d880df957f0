"""End to end: vLLM's OpenAI server with the vllm_jd plugin serves a JD collection beside a plain LoRA.

The server runs in the separate vLLM virtualenv (`.ci/vllm_env.sh`; vLLM pins its own torch and transformers), in a
subprocess on a free loopback port, with a tiny Llama built here (no download) and a char-level tokenizer. Greedy
outputs of a concurrent burst mixing JD adapters, the plain LoRA and the base model must equal those of a merged dense
reference computed in this (main) environment: `W + scaling · U Σ Vᵀ` for JD adapters, PEFT's merged LoRA for the
plain one. Skipped, with the reason, only when the vLLM virtualenv is absent.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from vllm_server import VLLMServer

from peft_jd.core import BasesConfig, write_bases, write_sigma_adapter


REPO = Path(__file__).resolve().parents[1]
VENV_PYTHON = Path(os.environ.get("VLLM_JD_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
pytestmark = pytest.mark.skipif(
    not VENV_PYTHON.exists(),
    reason=f"no vLLM virtualenv at {VENV_PYTHON}: create it with `bash .ci/vllm_env.sh` (or set VLLM_JD_PYTHON)",
)

TARGETS = ["q_proj", "k_proj", "v_proj"]
# Every projection of a Llama layer: column-parallel q/k/v/gate/up and row-parallel o/down under tensor parallelism.
ALL_TARGETS = [*TARGETS, "o_proj", "gate_proj", "up_proj", "down_proj"]
N_ADAPTERS = 120
RANK = 4
NEW_TOKENS = 8
PROMPTS = ["hello world", "the quick brown fox", "jd lora serve", "abc abc abc", "vllm plugin test", "zipf"]
SERVED = "tiny"


def build_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII (BPE without merges), saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, decoders, models

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + [chr(c) for c in range(32, 127)])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    return fast


def build_model(directory: Path, vocab_size: int) -> LlamaForCausalLM:
    """A 2-layer Llama whose head sizes vLLM's CPU attention supports (head_dim 32), with peaked logits.

    Greedy decoding of a random model meets near-ties; a larger output head keeps the top-2 margins far above fp32
    rounding, so vLLM (fp32) and the float64 reference pick the same tokens.
    """
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def build_collection(root: Path, model, n_adapters: int = N_ADAPTERS, clusters: int = 2, seed: int = 0,
                     targets: tuple[str, ...] = tuple(TARGETS)) -> dict:
    """Random orthonormal bases (2 clusters) and `n_adapters` full-Σ adapters for `targets` of every layer."""
    targets = list(targets)
    gen = torch.Generator().manual_seed(seed)
    bases, sigmas = {}, {f"task-{i}": {} for i in range(n_adapters)}
    linears = {n: m for n, m in model.named_modules() if n.split(".")[-1] in targets}
    for key, lin in linears.items():
        U = torch.linalg.qr(torch.randn(clusters, lin.out_features, RANK, generator=gen))[0]
        V = torch.linalg.qr(torch.randn(clusters, lin.in_features, RANK, generator=gen))[0]
        bases[key] = (U.contiguous(), V.contiguous())
        for name in sigmas:
            sigmas[name][key] = 3.0 * torch.randn(RANK, RANK, generator=gen)
    config = write_bases(root / "bases", bases, BasesConfig(RANK, "full", clusters, "tiny", targets, {}))
    for i, name in enumerate(sigmas):
        adapter_config = {
            "peft_type": "JDLORA", "r": RANK, "sigma_type": "full", "target_modules": targets, "bases": "../../bases",
            "bases_fingerprint": config.fingerprint, "cluster": i % clusters, "scaling": 0.5 + (i % 3) * 0.25,
            "base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM",
        }
        write_sigma_adapter(root / "adapters" / name, sigmas[name], adapter_config)
    return {"bases": bases, "sigmas": sigmas, "clusters": clusters}


def jd_merged(model, collection: dict, root: Path, name: str):
    """The base model with `scaling · U Σ Vᵀ` of adapter `name` added to each covered weight."""
    config = json.loads((root / "adapters" / name / "adapter_config.json").read_text())
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for key, (U, V) in collection["bases"].items():
            c = config["cluster"]
            modules[key].weight += config["scaling"] * U[c] @ collection["sigmas"][name][key] @ V[c].T
    return merged


def build_plain_lora(directory: Path, model) -> LlamaForCausalLM:
    """A PEFT rank-8 LoRA on q/v with random A and B, saved; returns the merged reference model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(20.0)
    peft_model.save_pretrained(directory)
    return peft_model.merge_and_unload().eval()


def greedy(model, tokenizer, prompt: str) -> list[int]:
    """Greedy token ids, each step a full float64 forward (no cache): the most exact reference there is."""
    model = copy.deepcopy(model).double()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            token = int(model(ids).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def write_corrupt_adapter(directory: Path, like: Path) -> None:
    """A JD adapter whose Σ holds NaN (its config is a valid one's)."""
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text((like / "adapter_config.json").read_text())
    key = "base_model.model.model.layers.0.self_attn.q_proj.jd_sigma"
    save_file({key: torch.full((RANK, RANK), float("nan"))}, str(directory / "adapter_model.safetensors"))


def Server(model_dir: Path, args: list[str], env: dict[str, str], log: Path) -> VLLMServer:
    """The vLLM venv's OpenAI server on the test model (float32, greedy-reproducible), stopped by `stop()`."""
    return VLLMServer(str(VENV_PYTHON), model_dir, ["--dtype", "float32", "--max-model-len", "256", "--seed", "0",
                                                    *args], {**os.environ, **env}, log, served_name=SERVED)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Model, tokenizer, a 120-adapter JD collection (with one corrupt adapter), a plain LoRA, other bases."""
    work = tmp_path_factory.mktemp("vllm-e2e")
    model_dir, root, plain_dir = work / "model", work / "collection", work / "plain-lora"
    tokenizer = build_tokenizer(model_dir)
    model = build_model(model_dir, len(tokenizer))
    collection = build_collection(root, model)
    plain_merged = build_plain_lora(plain_dir, model)
    extra_root = work / "extra"
    build_collection(extra_root, model, n_adapters=1, seed=1)  # other bases: refused beside the served collection
    # task-7 copied outside any configured collection, its bases referenced by absolute path.
    outside = work / "outside" / "task-7"
    outside.mkdir(parents=True)
    config = json.loads((root / "adapters" / "task-7" / "adapter_config.json").read_text())
    (outside / "adapter_config.json").write_text(json.dumps({**config, "bases": str(root / "bases")}))
    (outside / "adapter_model.safetensors").write_bytes((root / "adapters" / "task-7" / "adapter_model.safetensors")
                                                        .read_bytes())
    write_corrupt_adapter(root / "adapters" / "broken", root / "adapters" / "task-0")
    every_root = work / "every-projection"  # for tensor parallelism: column- and row-parallel layers
    every = build_collection(every_root, model, n_adapters=4, seed=2, targets=ALL_TARGETS)
    return {"work": work, "model_dir": model_dir, "model": model, "tokenizer": tokenizer, "collection": collection,
            "root": root, "plain_dir": plain_dir, "plain": plain_merged, "outside": outside, "extra_root": extra_root,
            "every_root": every_root, "every": every}


ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
       "VLLM_LOGGING_LEVEL": "INFO", "OMP_NUM_THREADS": "2"}


@pytest.fixture(scope="module")
def served(built):
    """vLLM with --enable-lora (its LoRA path runs the model eagerly): JD adapters beside a plain LoRA."""
    root, plain_dir, model_dir, work = built["root"], built["plain_dir"], built["model_dir"], built["work"]
    args = ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "1", "--max-cpu-loras", "2",
            "--lora-modules", f"task-0={root / 'adapters' / 'task-0'}", f"task-1={root}", f"plain={plain_dir}"]
    server = Server(model_dir, args, {**ENV, "VLLM_JD_COLLECTIONS": str(root)}, work / "server.log")
    try:
        server.wait_ready()
        yield {**built, "server": server}
    finally:
        server.stop()


# The `openai` client lives in the vLLM venv (the main environment does not need it): this script sends a burst of
# completions concurrently and prints, per job, the greedy token ids or the error status.
CLIENT_SCRIPT = """
import concurrent.futures, json, sys
import openai
url, jobs = sys.argv[1], json.load(sys.stdin)
client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
def run(job):
    try:
        r = client.completions.create(model=job["model"], prompt=job["prompt"], max_tokens=job["max_tokens"],
                                      temperature=0.0, extra_body={"ignore_eos": True, "return_token_ids": True})
        return {"ids": list(r.choices[0].token_ids)}
    except openai.APIStatusError as exc:
        return {"status": exc.status_code, "error": str(exc)}
with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
    print(json.dumps(list(pool.map(run, jobs))))
"""


def complete(served, jobs: list[tuple[str, str]]) -> list[dict]:
    """Sends `(model, prompt)` jobs concurrently with the openai client; returns `{"ids": …}` or `{"status": …}`."""
    payload = json.dumps([{"model": m, "prompt": p, "max_tokens": NEW_TOKENS} for m, p in jobs])
    result = subprocess.run([str(VENV_PYTHON), "-c", CLIENT_SCRIPT, served["server"].url], input=payload,
                            capture_output=True, text=True, timeout=600, check=True)
    return json.loads(result.stdout)


def test_mixed_burst_matches_dense_reference(served):
    """JD adapters (static and runtime-resolved), the plain LoRA and the base model, concurrently, greedy."""
    names = ["task-0", "task-1", "task-57", "task-118", "plain", SERVED]
    jobs = [(name, prompt) for prompt in PROMPTS for name in names]
    # task-57 and task-118 are not in --lora-modules: the first request resolves them from VLLM_JD_COLLECTIONS.
    got = [r.get("ids", r) for r in complete(served, jobs)]
    references = {SERVED: served["model"], "plain": served["plain"]}
    for name in names[:4]:
        references[name] = jd_merged(served["model"], served["collection"], served["root"], name)
    want = [greedy(references[name], served["tokenizer"], prompt) for name, prompt in jobs]
    mismatches = [(job, g, w) for job, g, w in zip(jobs, got, want) if g != w]
    assert not mismatches, f"{len(mismatches)}/{len(jobs)} differ, e.g. {mismatches[:3]}"
    # The adapters change the outputs (the comparison above could not pass by serving the base model).
    base = {prompt: w for (name, prompt), w in zip(jobs, want) if name == SERVED}
    assert sum(w != base[prompt] for (name, prompt), w in zip(jobs, want) if name != SERVED) >= len(PROMPTS) * 4


def test_unknown_and_corrupt_adapters_are_errors_and_server_keeps_serving(served):
    unknown, broken, after = complete(served, [("no-such-adapter", "hello"), ("broken", "hello")]) + complete(
        served, [("task-3", "still up")]
    )
    assert unknown["status"] == 404, unknown
    assert broken["status"] == 400, broken  # found in the collection, NaN Σ: refused
    want = greedy(jd_merged(served["model"], served["collection"], served["root"], "task-3"), served["tokenizer"],
                  "still up")
    assert after == {"ids": want}


def test_load_and_unload_endpoints(served):
    import urllib.error
    import urllib.request

    url = served["server"].url

    def post(path, body):
        request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert post("/v1/load_lora_adapter", {"lora_name": "outside-7", "lora_path": str(served["outside"])}) == 200
    want = greedy(jd_merged(served["model"], served["collection"], served["root"], "task-7"), served["tokenizer"],
                  "loaded")
    assert complete(served, [("outside-7", "loaded")]) == [{"ids": want}]
    assert post("/v1/unload_lora_adapter", {"lora_name": "outside-7"}) == 200
    assert complete(served, [("outside-7", "loaded")])[0]["status"] == 404
    # Another collection's bases cannot join the served collection: an error status, not a crash.
    other = served["extra_root"] / "adapters" / "task-0"
    assert post("/v1/load_lora_adapter", {"lora_name": "other-0", "lora_path": str(other)}) >= 400
    assert complete(served, [(SERVED, "ok")]) == [{"ids": greedy(served["model"], served["tokenizer"], "ok")}]


def test_jd_only_server_runs_the_compiled_model(built):
    """Without --enable-lora, vLLM's CPU build compiles the model (dynamo + inductor, traced once): the JD op must
    still read each step's slots at run time. Started after the other server is used, and stopped here."""
    args = ["--lora-modules", f"task-0={built['root'] / 'adapters' / 'task-0'}"]
    server = Server(built["model_dir"], args, {**ENV, "VLLM_JD_COLLECTIONS": str(built["root"])},
                    built["work"] / "server-compiled.log")
    try:
        server.wait_ready()
        names = ["task-0", "task-9", "task-64", SERVED]
        jobs = [(name, prompt) for prompt in PROMPTS[:4] for name in names]
        got = [r.get("ids", r) for r in complete({"server": server}, jobs)]
        assert "DYNAMO_TRACE_ONCE" in (built["work"] / "server-compiled.log").read_text()
    finally:
        server.stop()
    references = {SERVED: built["model"]}
    for name in names[:3]:
        references[name] = jd_merged(built["model"], built["collection"], built["root"], name)
    want = [greedy(references[name], built["tokenizer"], prompt) for name, prompt in jobs]
    assert got == want


def test_tensor_parallel_2_matches_dense_reference(built):
    """--tensor-parallel-size 2 on two CPU workers (one core each): adapters on every projection (column-parallel
    q/k/v/gate/up, row-parallel o/down, whose partial updates the all-reduce sums) in one burst with base requests
    equal the merged dense reference. Eager mode keeps the start short (the compiled path runs at tp 1 above)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallel 2 on vLLM's CPU build needs two cores (one per worker)")
    env = {**ENV, "VLLM_JD_COLLECTIONS": str(built["every_root"]), "OMP_NUM_THREADS": "1",
           # vLLM binds each CPU worker's threads to a NUMA node; with one node, bind them by hand.
           "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}"}
    server = Server(built["model_dir"], ["--tensor-parallel-size", "2", "--enforce-eager"], env,
                    built["work"] / "server-tp2.log")
    try:
        # The references are computed while the server starts (it spends most of a minute importing vLLM).
        names = ["task-0", "task-1", "task-2", SERVED]
        jobs = [(name, prompt) for prompt in PROMPTS[:4] for name in names]
        references = {SERVED: built["model"]}
        for name in names[:3]:
            references[name] = jd_merged(built["model"], built["every"], built["every_root"], name)
        want = [greedy(references[name], built["tokenizer"], prompt) for name, prompt in jobs]
        server.wait_ready()
        got = [r.get("ids", r) for r in complete({"server": server}, jobs)]
        log = (built["work"] / "server-tp2.log").read_text()
    finally:
        server.stop()
    assert "tensor_parallel_size=2" in log and "Worker_TP1" in log
    assert got == want
    base = {prompt: w for (name, prompt), w in zip(jobs, want) if name == SERVED}
    assert sum(w != base[prompt] for (name, prompt), w in zip(jobs, want) if name != SERVED) >= 8


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
