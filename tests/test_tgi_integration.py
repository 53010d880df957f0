"""Integration with TGI's real server code (text-generation-inference v3.3.7 `server/`), on CPU.

Runs when `text_generation_server` is importable (a TGI checkout's `server/` on PYTHONPATH with its protos generated,
see docs/tgi.md), and is skipped otherwise. TGI's own code does the work: `get_model_with_lora_adapters` (with
`get_model` replaced by a tiny model built from TGI's real adapter layers), `load_module_map`, `prepare_weights`,
`LayerAdapterWeights`, `find_segments`, `AdapterBatchData.from_meta` and the layers' `forward`. TGI's LoRA kernels
are CUDA (punica) or IPEX only, so a pure-PyTorch stand-in for the punica helpers that TGI's non-vectorised LoRA path
(`LoraLinear.forward_lora`) calls lets plain LoRA adapters run next to the JD adapters on CPU.
"""

from __future__ import annotations

import importlib.util
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from forked_ranks import run_forked_ranks


pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("text_generation_server") is None,
    reason="TGI's server code is not importable: put a text-generation-inference checkout's server/ (protos "
           "generated) on PYTHONPATH to run these tests (see docs/tgi.md)",
)

JD_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_MODULES = ["q_proj", "v_proj", "o_proj", "down_proj"]
R = 4


class PunicaStandIn:
    """The punica helpers TGI calls outside its CUDA kernels; custom-rank kernels disabled so TGI takes the
    PyTorch loop (`forward_lora`)."""

    MAX_RANK_CUSTOM = -1
    BGMV_MAX_RANK = 64

    @staticmethod
    def use_cutlass_shrink(rank):
        return False

    @staticmethod
    def orient_for_rank(tensor, rank):
        return tensor

    @staticmethod
    def pad_rank(tensor, dim, world_size):
        return tensor

    @staticmethod
    def get_tmp_tensors(num_segments, rank, device):
        return None, None


@pytest.fixture(scope="module")
def tgi():
    os.environ.setdefault("ATTENTION", "paged")
    os.environ.setdefault("PREFIX_CACHING", "0")
    import tgi_patch

    tgi_patch.install()
    modules = SimpleNamespace(
        models=importlib.import_module("text_generation_server.models"),
        globals=importlib.import_module("text_generation_server.models.globals"),
        adapter=importlib.import_module("text_generation_server.utils.adapter"),
        weights=importlib.import_module("text_generation_server.adapters.weights"),
        lora=importlib.import_module("text_generation_server.adapters.lora"),
        layers=importlib.import_module("text_generation_server.layers.lora"),
        tp=importlib.import_module("text_generation_server.layers.tensor_parallel"),
        linear=importlib.import_module("text_generation_server.layers.linear"),
        segments=importlib.import_module("text_generation_server.utils.segments"),
        dist=importlib.import_module("text_generation_server.utils.dist"),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modules.lora, "punica_sgmv", PunicaStandIn)
        patch.setattr(modules.layers, "punica_sgmv", PunicaStandIn)
        yield modules


def _write_collection(root, model, modules=tuple(JD_MODULES)):
    """Two JD adapters over `modules` (default: all seven linear modules), 2 clusters, per-module clusters for
    `jd-1`."""
    from peft_jd.core import BasesConfig, write_bases, write_sigma_adapter
    from peft_jd.tuner.config import JDLoraConfig

    gen = torch.Generator().manual_seed(0)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in
               modules}
    bases, sigmas, clusters = {}, {"jd-0": {}, "jd-1": {}}, {"jd-0": 0, "jd-1": {}}
    for index, (key, lin) in enumerate(linears.items()):
        bases[key] = (torch.linalg.qr(torch.randn(2, lin.out_features, R, generator=gen))[0].contiguous(),
                      torch.linalg.qr(torch.randn(2, lin.in_features, R, generator=gen))[0].contiguous())
        for name in sigmas:
            sigmas[name][key] = torch.randn(R, R, generator=gen)
        clusters["jd-1"][key] = index % 2
    config = write_bases(root / "bases", bases, BasesConfig(r=R, sigma_type="full", num_clusters=2,
                                                            base_model_name_or_path="tiny-llama",
                                                            target_modules=list(modules), modules={}))
    for name in sigmas:
        write_sigma_adapter(root / name, sigmas[name], JDLoraConfig(
            r=R, target_modules=list(modules), bases="../bases", bases_fingerprint=config.fingerprint,
            cluster=clusters[name], base_model_name_or_path="tiny-llama", task_type="CAUSAL_LM"))
    deltas = {}
    for name in sigmas:
        for key in linears:
            cluster = clusters[name] if isinstance(clusters[name], int) else clusters[name][key]
            U, V = bases[key]
            deltas[(name, key)] = U[cluster] @ sigmas[name][key] @ V[cluster].T
    return deltas


def _write_lora(root, model):
    """A real PEFT LoRA (random A and B) saved with `save_pretrained`; PEFT's own ΔW is the reference."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=R, lora_alpha=8, target_modules=LORA_MODULES,
                                                  init_lora_weights=False))
    peft_model.save_pretrained(root / "plain")
    prefix = "base_model.model."
    return {("plain", name[len(prefix):]): module.get_delta_weight("default").detach()
            for name, module in peft_model.named_modules() if hasattr(module, "lora_A") and "default" in module.lora_A}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from utils import tiny_llama

    root = tmp_path_factory.mktemp("tgi_adapters")
    base = tiny_llama()
    deltas = _write_collection(root, base)
    deltas.update(_write_lora(root, tiny_llama()))
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    return root, deltas, weights


def _tgi_model(tgi, weights, process_group, world_size=1, rank=0):
    """A two-layer Llama-shaped model built from TGI's real adapter layers, sharded like TGI shards Llama."""
    def part(tensor, dim):
        return tensor.chunk(world_size, dim)[rank].contiguous()

    def column(i, names, prefix):
        stacked = torch.cat([part(weights[f"model.layers.{i}.{prefix}.{n}"], 0) for n in names])
        sizes = [weights[f"model.layers.{i}.{prefix}.{n}"].shape[0] for n in names]
        base = tgi.tp.TensorParallelColumnLinear(tgi.linear.FastLinear(stacked, None))
        return tgi.layers.TensorParallelMultiAdapterLinear.load(base, i, names, sizes, process_group)

    def row(i, name, prefix):
        linear = tgi.linear.FastLinear(part(weights[f"model.layers.{i}.{prefix}.{name}"], 1), None)
        return tgi.layers.TensorParallelAdapterRowLinear.load(
            tgi.tp.TensorParallelRowLinear(linear, process_group), i, name, process_group)

    layers = [SimpleNamespace(
        self_attn=SimpleNamespace(query_key_value=column(i, ["q_proj", "k_proj", "v_proj"], "self_attn"),
                                  o_proj=row(i, "o_proj", "self_attn")),
        mlp=SimpleNamespace(gate_up_proj=column(i, ["gate_proj", "up_proj"], "mlp"),
                            down_proj=row(i, "down_proj", "mlp")),
    ) for i in range(2)]
    return SimpleNamespace(
        model=SimpleNamespace(model=SimpleNamespace(layers=layers)), model_id="tiny-llama", dtype=torch.float32,
        world_size=world_size, process_group=process_group, loaded_adapters=set(),
        layer_to_adapter_weights=defaultdict(tgi.weights.LayerAdapterWeights),
        tokenizers=SimpleNamespace(add_tokenizer=lambda index, tokenizer: None),
    )


def _load(tgi, root, holder, jd_names=("jd-0", "jd-1"), extra=()):
    """Runs TGI's `get_model_with_lora_adapters` (patched) on `holder`; returns TGI's adapter id → index map."""
    from tgi_patch import patches
    from tgi_patch.settings import ShardSettings
    from tgi_patch.state import reset_state

    reset_state()
    patches._SETTINGS = ShardSettings(enabled=True, jd_adapters=list(jd_names) + list(extra))
    infos = [tgi.adapter.AdapterInfo(id=name, path=str(root / name)) for name in ("plain", *jd_names)]
    adapter_to_index = {}
    original = tgi.models.get_model
    tgi.models.get_model = lambda *args, **kwargs: holder
    try:
        tgi.models.get_model_with_lora_adapters("tiny-llama", infos, None, False, None, None, None, None, False, 64,
                                                adapter_to_index)
    finally:
        tgi.models.get_model = original
    tgi.globals.set_adapter_to_index(adapter_to_index)
    return tgi.globals.get_adapter_to_index()


def _batch(tgi, index_map, requests, prefill):
    """TGI's batch metadata for `(adapter id, tokens)` requests, as FlashCausalLMBatch builds it."""
    token_ids = [name for name, count in requests for _ in range(count)]
    indices = torch.tensor([index_map.get(name, 0) for name in token_ids], dtype=torch.int64)
    segments, segment_indices = tgi.segments.find_segments(indices)
    meta = tgi.weights.AdapterBatchMetadata(adapter_indices=indices, adapter_set=set(indices.tolist()),
                                            adapter_segments=torch.tensor(segments, dtype=torch.int32),
                                            segment_indices=segment_indices)
    return token_ids, meta


def _run_layers(tgi, holder, adapter_data, inputs, world_size=1, rank=0):
    layer = holder.model.model.layers[1]

    def local(x):  # row-parallel layers read this shard's slice of their input
        return x.chunk(world_size, dim=1)[rank].contiguous()

    return {
        "qkv": layer.self_attn.query_key_value(inputs["qkv"], adapter_data),
        "o": layer.self_attn.o_proj(local(inputs["o"]), adapter_data),
        "gate_up": layer.mlp.gate_up_proj(inputs["gate_up"], adapter_data),
        "down": layer.mlp.down_proj(local(inputs["down"]), adapter_data),
    }


GROUPS = {"qkv": ("self_attn", ["q_proj", "k_proj", "v_proj"]), "o": ("self_attn", ["o_proj"]),
          "gate_up": ("mlp", ["gate_proj", "up_proj"]), "down": ("mlp", ["down_proj"])}


def _reference(weights, deltas, token_ids, inputs, name):
    prefix, modules = GROUPS[name]
    x = inputs[name]
    outs = []
    for module in modules:
        key = f"model.layers.1.{prefix}.{module}"
        rows = [weights[key] @ x[t] + (deltas[(a, key)] @ x[t] if (a, key) in deltas else 0)
                for t, a in enumerate(token_ids)]
        outs.append(torch.stack(rows))
    return torch.cat(outs, dim=1)


def _inputs(token_count):
    gen = torch.Generator().manual_seed(2)
    sizes = {"qkv": 64, "o": 64, "gate_up": 64, "down": 128}
    return {name: torch.randn(token_count, size, generator=gen) for name, size in sizes.items()}


@pytest.mark.parametrize("prefill", [True, False])
def test_mixed_lora_and_jd_batch_through_tgi(tgi, adapters, prefill):
    root, deltas, weights = adapters
    holder = _tgi_model(tgi, weights, tgi.dist.FakeGroup(0, 1))
    index_map = _load(tgi, root, holder)
    assert dict(index_map) == {"plain": 1, "jd-0": 2, "jd-1": 3} and holder.loaded_adapters == {1, 2, 3}
    per_request = 3 if prefill else 1
    requests = [("jd-0", per_request), ("plain", per_request), ("", per_request), ("jd-1", per_request),
                ("tiny-llama", 1), ("jd-0", 1)]
    token_ids, meta = _batch(tgi, index_map, requests, prefill)
    adapter_data = tgi.weights.AdapterBatchData.from_meta(meta, holder.layer_to_adapter_weights, prefill, None)
    # q_proj holds LoRA and JD adapters: TGI's data keeps the LoRA batch, the JD batch rides along.
    assert type(adapter_data.data["q_proj"]).__name__ == "BatchLoraWeights"
    assert sorted(adapter_data.jd_batches) == sorted(JD_MODULES)
    inputs = _inputs(len(token_ids))
    outputs = _run_layers(tgi, holder, adapter_data, inputs)
    for name, output in outputs.items():
        expected = _reference(weights, deltas, token_ids, inputs, name)
        torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_unknown_adapter_ids_and_missing_jd_adapters_are_reported(tgi, adapters):
    from peft_jd.core import JDLoraError, UnknownAdapterError

    root, _, weights = adapters
    index_map = _load(tgi, root, _tgi_model(tgi, weights, tgi.dist.FakeGroup(0, 1)))
    assert index_map.get("", 0) == 0 and index_map.get("tiny-llama", 0) == 0 and index_map.get("jd-1", 0) == 3
    with pytest.raises(UnknownAdapterError, match="'jd-7'.*Loaded adapters: jd-0, jd-1, plain"):
        index_map.get("jd-7", 0)
    with pytest.raises(JDLoraError, match=r"\['jd-9'\] were not loaded as JD adapters"):
        _load(tgi, root, _tgi_model(tgi, weights, tgi.dist.FakeGroup(0, 1)), extra=["jd-9"])


def test_tgi_layers_reject_jd_modules_they_cannot_serve(tgi, adapters, tmp_path):
    from peft_jd.core import AdapterFormatError

    root, _, weights = adapters
    holder = _tgi_model(tgi, weights, tgi.dist.FakeGroup(0, 1))
    for layer in holder.model.model.layers:
        layer.self_attn.query_key_value.layer_names = ["q_proj", "k_proj"]  # as if TGI did not apply v_proj here
    with pytest.raises(AdapterFormatError, match="applies adapters named \\['q_proj', 'k_proj'\\], not 'v_proj'"):
        _load(tgi, root, holder)


def test_jd_modules_outside_tgi_adapter_layers_fail_loading(tgi, adapters, tmp_path):
    """TGI maps `lm_head` but never prepares adapters for it: a JD adapter adapting it must not load partially."""
    from utils import tiny_llama

    from peft_jd.core import AdapterFormatError

    _, _, weights = adapters
    model = tiny_llama()
    _write_collection(tmp_path, model, modules=("q_proj", "lm_head"))
    holder = _tgi_model(tgi, weights, tgi.dist.FakeGroup(0, 1))
    holder.model.lm_head = SimpleNamespace()
    (tmp_path / "plain").symlink_to(adapters[0] / "plain")
    with pytest.raises(AdapterFormatError, match=r"\['jd-0', 'jd-1'\] adapt modules TGI does not apply.*lm_head"):
        _load(tgi, tmp_path, holder)


# --------------------------------------------------------------------------------------------- tensor parallel
def _tp_worker(rank, tgi, root, weights, port, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=2)
        holder = _tgi_model(tgi, weights, dist.group.WORLD, world_size=2, rank=rank)
        index_map = _load(tgi, root, holder)
        token_ids, meta = _batch(tgi, index_map, REQUESTS_TP, True)
        adapter_data = tgi.weights.AdapterBatchData.from_meta(meta, holder.layer_to_adapter_weights, True, None)
        outputs = _run_layers(tgi, holder, adapter_data, _inputs(len(token_ids)), world_size=2, rank=rank)
        dist.destroy_process_group()
        queue.put({(rank, name): value.tolist() for name, value in outputs.items()})
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test with it
        queue.put({"error": f"rank {rank}: {exc!r}"})


REQUESTS_TP = [("jd-1", 2), ("plain", 2), ("", 1), ("jd-0", 3)]


def test_tensor_parallel_two_shards_with_gloo(tgi, adapters):
    root, deltas, weights = adapters
    results = run_forked_ranks(_tp_worker, (tgi, root, weights), world_size=2, timeout=180)
    token_ids = [name for name, count in REQUESTS_TP for _ in range(count)]
    inputs = _inputs(len(token_ids))
    for name, (prefix, modules) in GROUPS.items():
        expected = _reference(weights, deltas, token_ids, inputs, name)
        shards = [torch.tensor(results[(rank, name)]) for rank in (0, 1)]
        if name in ("o", "down"):
            # Row-parallel: every shard holds the full output. TGI adds a plain LoRA's update only to the shard's
            # own output slice there, so only base and JD rows are compared.
            rows = [t for t, a in enumerate(token_ids) if a != "plain"]
            for shard in shards:
                torch.testing.assert_close(shard[rows], expected[rows], rtol=1e-4, atol=1e-4)
            continue
        # Column-parallel: shard r holds block r of every sub-layer's output.
        sizes = [weights[f"model.layers.1.{prefix}.{m}"].shape[0] // 2 for m in modules]
        pieces = [shard.split(sizes, dim=1) for shard in shards]
        full = torch.cat([torch.cat([pieces[0][i], pieces[1][i]], dim=1) for i in range(len(modules))], dim=1)
        torch.testing.assert_close(full, expected, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_shard_process_is_patched_through_sitecustomize(tgi):
    """A process started like a shard (environment from the launcher) has TGI's server module bound to the patches."""
    import subprocess
    import sys

    from tgi_patch.launcher import BOOT_DIR

    code = (
        "import text_generation_server.server as server\n"
        "from text_generation_server.adapters.weights import AdapterBatchData\n"
        "from text_generation_server.adapters.lora import LoraWeights\n"
        "from text_generation_server.layers.lora import LoraLinear\n"
        "import text_generation_server.utils.adapter as utils_adapter\n"
        "functions = [server.get_model_with_lora_adapters, server.set_adapter_to_index, AdapterBatchData.from_meta,\n"
        "             LoraWeights.prepare_weights.__func__, LoraLinear.forward_layer_type,\n"
        "             utils_adapter.load_module_map]\n"
        "print([getattr(f, '__peft_jd_patched__', False) for f in functions])\n"
    )
    env = dict(os.environ, PEFT_JD_TGI="1")
    env["PYTHONPATH"] = os.pathsep.join([BOOT_DIR, *sys.path])
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == str([True] * 6)


PINNED_STACK = os.environ.get("PEFT_JD_TGI_PINNED_STACK")

_PINNED_CHECK = """
import json, os, pathlib, sys
sys.path.insert(0, {tests!r})
import tgi_patch
from tgi_patch import adapter_files, forward, launcher, loading, patches, resolve, state, unknown, weights
# Before TGI imports them: the serving modules and peft_jd.core / peft_jd.kernels need neither peft nor transformers.
before_tgi = sorted(m for m in sys.modules if m.split(".")[0] in ("peft", "transformers"))
tgi_patch.install()
import peft, torch, transformers
import test_tgi_integration as t
from types import SimpleNamespace
modules = SimpleNamespace(**{{name: __import__(path, fromlist=["_"]) for name, path in {modules!r}.items()}})
modules.lora.punica_sgmv = modules.layers.punica_sgmv = t.PunicaStandIn
root = pathlib.Path({root!r})
refs = torch.load(root / "refs.pt")
holder = t._tgi_model(modules, refs["weights"], modules.dist.FakeGroup(0, 1))
index_map = t._load(modules, root, holder)
errors = {{}}
for prefill in (True, False):
    n = 3 if prefill else 1
    ids, meta = t._batch(modules, index_map, [("jd-0", n), ("plain", n), ("", n), ("jd-1", n)], prefill)
    data = modules.weights.AdapterBatchData.from_meta(meta, holder.layer_to_adapter_weights, prefill, None)
    inputs = t._inputs(len(ids))
    for name, out in t._run_layers(modules, holder, data, inputs).items():
        expected = t._reference(refs["weights"], refs["deltas"], ids, inputs, name)
        errors[f"{{prefill}}-{{name}}"] = (out - expected).abs().max().item()
print(json.dumps({{"versions": [transformers.__version__, peft.__version__], "errors": errors,
                  "before_tgi": before_tgi, "tuner_loaded": "peft_jd.tuner" in sys.modules}}))
"""


@pytest.mark.skipif(not PINNED_STACK, reason="set PEFT_JD_TGI_PINNED_STACK to a folder holding TGI 3.3.7's pinned "
                                             "transformers/peft/huggingface_hub/kernels (pip install --target)")
def test_patch_under_tgi_pinned_library_versions(tgi, adapters, tmp_path):
    """The shard side with TGI's own transformers 4.51 / peft 0.14 (peft-jd installed with --no-deps in the image)."""
    import json
    import subprocess
    import sys

    root, deltas, weights = adapters
    torch.save({"deltas": deltas, "weights": weights}, root / "refs.pt")
    modules = {"models": "text_generation_server.models", "globals": "text_generation_server.models.globals",
               "adapter": "text_generation_server.utils.adapter", "weights": "text_generation_server.adapters.weights",
               "lora": "text_generation_server.adapters.lora", "layers": "text_generation_server.layers.lora",
               "tp": "text_generation_server.layers.tensor_parallel", "linear": "text_generation_server.layers.linear",
               "segments": "text_generation_server.utils.segments", "dist": "text_generation_server.utils.dist"}
    code = _PINNED_CHECK.format(tests=os.path.dirname(os.path.abspath(__file__)), modules=modules, root=str(root))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PINNED_STACK, *sys.path]))
    result = subprocess.run([sys.executable, "-W", "default", "-c", code], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["versions"][1] != __import__("peft").__version__ and report["versions"][0].startswith("4.")
    assert report["before_tgi"] == [] and not report["tuner_loaded"]
    assert "PEFT tuner is unavailable" not in result.stderr, result.stderr[-3000:]
    assert max(report["errors"].values()) < 1e-4, report
