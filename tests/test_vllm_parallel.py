"""Tensor parallelism in the vLLM plugin: each rank's JD layer against the dense reference W x + U Σ Vᵀ x.

Main environment (no vLLM): one `JDStore` per rank gets the `LayerTarget`s vLLM's layout gives that rank; each rank's
layer (its weight block cut here as vLLM's loader cuts it) runs on its part of the input, and the ranks' outputs are
gathered (column-parallel: q/k/v, gate/up) or summed (row-parallel: o, down — vLLM's all-reduce) and compared with
the unsharded reference. With the vLLM virtualenv (`.ci/vllm_env.sh`), the layer discovery also runs on vLLM's own
linear layers: see `test_discovery_on_vllm_layers_matches_merged_weights`.
"""

from __future__ import annotations

import json
import os
import subprocess
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from peft_jd.core import BASE_SLOT, BasesConfig, load_shared_bases, write_bases, write_sigma_adapter
from peft_jd.core.errors import ShapeMismatchError
from vllm_jd.adapters import JDAdapterRef, read_checked_sigmas
from vllm_jd.ops import install_jd_update, set_current_store
from vllm_jd.store import COLUMN, ROW, JDStore, LayerTarget


class FakeLinear(torch.nn.Module):
    """A vLLM linear layer on one rank: its local matmul is `quant_method.apply(layer, x, bias)`."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight
        self.quant_method = types.SimpleNamespace(apply=lambda layer, x, bias=None: x @ layer.weight.T)

    def forward(self, x):
        return self.quant_method.apply(self, x, None), None


LAYER = "model.layers.0"


@dataclass(frozen=True)
class Dims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    def shapes(self) -> dict[str, tuple[int, int]]:
        """`(out_features, in_features)` of every module of a Llama layer, by bases module key."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        attn, mlp = f"{LAYER}.self_attn", f"{LAYER}.mlp"
        return {f"{attn}.q_proj": (q, h), f"{attn}.k_proj": (kv, h), f"{attn}.v_proj": (kv, h),
                f"{attn}.o_proj": (h, q), f"{mlp}.gate_proj": (i, h), f"{mlp}.up_proj": (i, h),
                f"{mlp}.down_proj": (h, i)}


LLAMA = Dims(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128)
MQA = Dims(hidden=48, heads=6, kv_heads=1, head_dim=8, intermediate=96)  # tp 3: the one kv head on every rank
# vLLM's packing of a Llama layer: (layer, parts, parallel).
PACKING = [("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj"), COLUMN), ("self_attn.o_proj", ("o_proj",), ROW),
           ("mlp.gate_up_proj", ("gate_proj", "up_proj"), COLUMN), ("mlp.down_proj", ("down_proj",), ROW)]


def _tp_collection(root, dims: Dims, clusters: int, sigma_type: str, n_adapters: int = 3, r: int = 4):
    """Random orthonormal bases for every module of `dims`, `n_adapters` adapters with distinct scalings, and
    random base weights W; returns them with `delta(adapter, key)` = scaling · U Σ Vᵀ computed by hand."""
    gen = torch.Generator().manual_seed(clusters)
    bases, weights, sigmas = {}, {}, {f"task-{i}": {} for i in range(n_adapters)}
    for key, (out_f, in_f) in dims.shapes().items():
        U = torch.linalg.qr(torch.randn(clusters, out_f, r, generator=gen))[0].contiguous()
        V = torch.linalg.qr(torch.randn(clusters, in_f, r, generator=gen))[0].contiguous()
        bases[key], weights[key] = (U, V), torch.randn(out_f, in_f, generator=gen) / in_f**0.5
        for name in sigmas:
            sigmas[name][key] = torch.randn((r, r) if sigma_type == "full" else (r,), generator=gen)
    leaves = sorted({key.rpartition(".")[2] for key in bases})
    config = write_bases(root / "bases", bases, BasesConfig(r, sigma_type, clusters, "tiny", leaves, {}))
    scaling = {name: 0.5 + 0.25 * i for i, name in enumerate(sigmas)}
    cluster = {name: i % clusters for i, name in enumerate(sigmas)}
    for name in sigmas:
        write_sigma_adapter(root / "adapters" / name, sigmas[name], {
            "peft_type": "JDLORA", "r": r, "sigma_type": sigma_type, "target_modules": leaves, "bases": "../../bases",
            "bases_fingerprint": config.fingerprint, "cluster": cluster[name], "scaling": scaling[name],
            "base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM"})

    def delta(name: str, key: str) -> torch.Tensor:
        U, V = bases[key]
        sigma = sigmas[name][key]
        sigma = sigma if sigma.dim() == 2 else torch.diag(sigma)
        return scaling[name] * U[cluster[name]] @ sigma @ V[cluster[name]].T

    return types.SimpleNamespace(root=root, weights=weights, delta=delta, names=list(sigmas))


def _shards(dims: Dims, tp: int, rank: int, parts: tuple[str, ...]) -> list[tuple[int, int]]:
    """vLLM's column-parallel layout: block `rank` of `tp`, except k/v when kv heads are replicated over ranks."""
    replicas = max(1, tp // dims.kv_heads)
    return [(rank // replicas, tp // replicas) if part in ("k_proj", "v_proj") else (rank, tp) for part in parts]


def _block(tensor: torch.Tensor, dim: int, shard: tuple[int, int]) -> torch.Tensor:
    size = tensor.shape[dim] // shard[1]
    return tensor.narrow(dim, shard[0] * size, size)


def _rank_layers(coll, dims: Dims, tp: int, rank: int) -> list[tuple[str, FakeLinear, LayerTarget]]:
    """Rank `rank`'s vLLM layers: their weight blocks (cut here, as vLLM's loader does) and `LayerTarget`s."""
    layers, shapes = [], dims.shapes()
    for layer_name, parts, parallel in PACKING:
        name, keys = f"{LAYER}.{layer_name}", tuple(f"{LAYER}.{layer_name.split('.')[0]}.{p}" for p in parts)
        if parallel == COLUMN:
            shards = _shards(dims, tp, rank, parts)
            weight = torch.cat([_block(coll.weights[k], 0, sh) for k, sh in zip(keys, shards)])
            sizes = tuple(shapes[k][0] // sh[1] for k, sh in zip(keys, shards))
            target = LayerTarget(name, keys, sizes, COLUMN, output_shards=tuple(shards), input_size=shapes[keys[0]][1])
        else:
            weight = _block(coll.weights[keys[0]], 1, (rank, tp))
            target = LayerTarget(name, keys, (shapes[keys[0]][0],), ROW, input_shard=(rank, tp),
                                 input_size=shapes[keys[0]][1] // tp)
        layers.append((name, FakeLinear(weight), target))
    return layers


def _rank_store(coll, layers) -> tuple[JDStore, dict[str, int]]:
    store = JDStore(initial_capacity=2)
    for _, module, target in layers:
        install_jd_update(module, store.add_layer(target))
    slots = {}
    for name in coll.names:
        ref = JDAdapterRef(name, len(slots) + 1, str(coll.root / "adapters" / name))
        spec = ref.spec()
        bases = load_shared_bases(*spec.bases_reference())
        store.attach_bases(bases)
        sigmas = read_checked_sigmas(spec, ref.directory, bases.config, "test bases")
        slots[name] = store.load(ref.key, sigmas, {k: spec.cluster_of(k) for k in sigmas}, spec.scaling)
    return store, slots


@pytest.mark.parametrize("tp, dims, clusters, sigma_type", [
    (2, LLAMA, 1, "full"),   # single cluster: q/k/v and gate/up fused per rank
    (2, LLAMA, 2, "diag"),
    (4, LLAMA, 2, "full"),   # 2 kv heads over 4 ranks: ranks 0-1 hold kv head 0, ranks 2-3 kv head 1
    (3, MQA, 1, "diag"),     # 1 kv head replicated on all 3 ranks
    (3, MQA, 2, "full"),
], ids=["tp2-fused", "tp2-diag", "tp4-kv-replicated", "tp3-mqa-fused", "tp3-mqa"])
def test_tensor_parallel_ranks_sum_to_dense_reference(tmp_path, single_thread, tp, dims, clusters, sigma_type):
    coll = _tp_collection(tmp_path, dims, clusters, sigma_type)
    row_adapters = ["task-0", None, "task-1", "task-2", "task-2", None, "task-0"]  # mixed clusters and base rows
    ranks = []
    for rank in range(tp):
        layers = _rank_layers(coll, dims, tp, rank)
        store, slots = _rank_store(coll, layers)
        ranks.append((layers, store, [BASE_SLOT if a is None else slots[a] for a in row_adapters]))
    shapes = dims.shapes()
    for index, (layer_name, parts, parallel) in enumerate(PACKING):
        keys = [f"{LAYER}.{layer_name.split('.')[0]}.{p}" for p in parts]
        x = torch.randn(len(row_adapters), shapes[keys[0]][1], generator=torch.Generator().manual_seed(index))
        # Reference per module: W x + scaling · U Σ Vᵀ x of each row's adapter.
        want = {k: x @ coll.weights[k].T for k in keys}
        for t, adapter in enumerate(row_adapters):
            for k in keys:
                if adapter is not None:
                    want[k][t] += coll.delta(adapter, k) @ x[t]
        outputs = []
        for layers, store, slots in ranks:
            set_current_store(store)
            store.set_token_slots(slots)
            module, target = layers[index][1], layers[index][2]
            local_x = x if parallel == COLUMN else _block(x, 1, target.input_shard)
            outputs.append(module(local_x)[0])
        set_current_store(None)
        if parallel == ROW:  # vLLM's all-reduce
            torch.testing.assert_close(sum(outputs), want[keys[0]], rtol=1e-4, atol=1e-4)
            continue
        for part, k in enumerate(keys):  # all-gather, each replicated block checked on every rank holding it
            blocks = {}
            for rank, y in enumerate(outputs):
                target = ranks[rank][0][index][2]
                begin = sum(target.output_sizes[:part])
                block = y[:, begin : begin + target.output_sizes[part]]
                blocks.setdefault(target.output_shard(part), []).append(block)
            count = next(iter(blocks))[1]
            assert sorted(blocks) == [(i, count) for i in range(count)]
            for same in blocks.values():
                for other in same[1:]:
                    torch.testing.assert_close(other, same[0])
            gathered = torch.cat([blocks[(i, count)][0] for i in range(count)], dim=1)
            torch.testing.assert_close(gathered, want[k], rtol=1e-4, atol=1e-4)
    # Each rank holds only its blocks of U (column layers) and V (row layers).
    layers, store = ranks[-1][0], ranks[-1][1]
    placed = {key: proj for proj in store.projections() for key, _ in proj.parts}
    q_key, o_key = f"{LAYER}.self_attn.q_proj", f"{LAYER}.self_attn.o_proj"
    assert placed[o_key].V.shape[1] == shapes[o_key][1] // tp and placed[o_key].U.shape[1] == shapes[o_key][0]
    assert placed[q_key].V.shape[1] == shapes[q_key][1]
    if clusters > 1:
        assert placed[q_key].U.shape[1] == shapes[q_key][0] // tp


def test_tensor_parallel_size_that_does_not_divide_is_refused(tmp_path):
    coll = _tp_collection(tmp_path, LLAMA, 1, "full", n_adapters=1)
    layers = _rank_layers(coll, MQA, 1, 0)[:1]  # a layer of another model
    with pytest.raises(ShapeMismatchError, match="out_features=64, but vLLM layer .* gives it 48 output columns"):
        _rank_store(coll, layers)
    # o_proj's 64 input columns over 3 ranks: a clear error, and the store is left without bases.
    store = JDStore()
    store.add_layer(LayerTarget(f"{LAYER}.self_attn.o_proj", (f"{LAYER}.self_attn.o_proj",), (64,), ROW,
                                input_shard=(1, 3), input_size=21))
    bases = load_shared_bases(str(tmp_path / "bases"))
    with pytest.raises(ShapeMismatchError, match="does not split into 3 equal tensor-parallel blocks"):
        store.attach_bases(bases)
    assert store.bases is None and not list(store.projections())


def test_layer_target_rejects_inconsistent_layouts():
    with pytest.raises(ValueError, match="row-parallel layer cannot shard its output"):
        LayerTarget("o", ("o",), (8,), ROW, output_shards=((1, 2),))
    with pytest.raises(ValueError, match="column-parallel layer cannot shard its input"):
        LayerTarget("q", ("q",), (8,), COLUMN, input_shard=(0, 2))
    with pytest.raises(ValueError, match="shard 2 of 2 does not exist"):
        LayerTarget("q", ("q",), (8,), COLUMN, output_shards=((2, 2),))
    with pytest.raises(ValueError, match="2 parts but 1 output shards"):
        LayerTarget("qk", ("q", "k"), (8, 8), COLUMN, output_shards=((0, 2),))


# -- discovery on vLLM's own layers (in the vLLM virtualenv) -------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
VENV_PYTHON = Path(os.environ.get("VLLM_JD_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))

# Runs in the vLLM venv. Per (tp, rank), with vLLM's tensor-parallel group faked (its layers only read the rank and
# size), builds a Llama layer of vLLM's QKVParallelLinear / RowParallelLinear / MergedColumnParallelLinear four
# times, each loaded by vLLM's own weight loaders (which cut this rank's blocks): from W with the plugin installed
# (`discover_layers`, `install_jd_update`), and from W, W + ΔW(task-0), W + ΔW(task-1) without it. Row-parallel layers
# split the input themselves (input_is_parallel=False) and skip the all-reduce (reduce_results=False): their outputs
# are the rank's partial sums. Prints, per rank and layer, the discovered target and the largest difference between
# the plugin's rows and the merged layers' rows.
DISCOVERY_SCRIPT = r"""
import json, sys, types
import torch
from safetensors.torch import load_file
import vllm.distributed.parallel_state as ps
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from peft_jd.core import BASE_SLOT, load_shared_bases
from vllm_jd.adapters import JDAdapterRef, read_checked_sigmas
from vllm_jd.ops import install_jd_update, set_current_store
from vllm_jd.store import JDStore
from vllm_jd.worker import discover_layers

args = json.loads(sys.argv[1])
d, tensors, root, rows = args["dims"], load_file(args["weights"]), args["root"], args["rows"]
attn, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
torch.manual_seed(0)
xs = {"qkv": torch.randn(len(rows), d["hidden"]), "o": torch.randn(len(rows), d["heads"] * d["head_dim"]),
      "gate_up": torch.randn(len(rows), d["hidden"]), "down": torch.randn(len(rows), d["intermediate"])}

def load(layer, variant, shards):
    for shard_id, key in shards:
        w = tensors[f"{variant}/{key}"]
        layer.weight.weight_loader(layer.weight, w) if shard_id is None else layer.weight.weight_loader(
            layer.weight, w, shard_id)
    layer.quant_method.process_weights_after_loading(layer)
    return layer

def build(variant):
    h, q = d["hidden"], d["heads"] * d["head_dim"]
    model, inner, block = torch.nn.Module(), torch.nn.Module(), torch.nn.Module()
    model.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                    "gate_up_proj": ["gate_proj", "up_proj"]}
    block.self_attn, block.mlp = torch.nn.Module(), torch.nn.Module()
    block.self_attn.qkv_proj = load(QKVParallelLinear(h, d["head_dim"], d["heads"], d["kv_heads"], bias=False),
                                    variant, [(p, f"{attn}.{p}_proj") for p in "qkv"])
    block.self_attn.o_proj = load(RowParallelLinear(q, h, bias=False, input_is_parallel=False, reduce_results=False),
                                  variant, [(None, f"{attn}.o_proj")])
    block.mlp.gate_up_proj = load(MergedColumnParallelLinear(h, [d["intermediate"]] * 2, bias=False), variant,
                                  [(0, f"{mlp}.gate_proj"), (1, f"{mlp}.up_proj")])
    block.mlp.down_proj = load(RowParallelLinear(d["intermediate"], h, bias=False, input_is_parallel=False,
                                                 reduce_results=False), variant, [(None, f"{mlp}.down_proj")])
    inner.layers = torch.nn.ModuleList([block])
    model.model = inner
    return model

report = []
for tp in args["tp_sizes"]:
    for rank in range(tp):
        ps._TP = types.SimpleNamespace(world_size=tp, rank_in_group=rank)
        models = {v: build(v) for v in ("base", "task-0", "task-1")}
        jd_model, store = build("base"), JDStore(initial_capacity=4)
        found = discover_layers(jd_model)
        for _, base, target in found:
            install_jd_update(base, store.add_layer(target))
        slots = {}
        for name in ("task-0", "task-1"):
            ref = JDAdapterRef(name, len(slots) + 1, f"{root}/adapters/{name}")
            spec = ref.spec()
            bases = load_shared_bases(*spec.bases_reference())
            store.attach_bases(bases)
            sigmas = read_checked_sigmas(spec, ref.directory, bases.config, "bases")
            slots[name] = store.load(ref.key, sigmas, {k: spec.cluster_of(k) for k in sigmas}, spec.scaling)
        set_current_store(store)
        store.set_token_slots([slots[a] if a else BASE_SLOT for a in rows])
        modules = {n: m for n, m in jd_model.named_modules()}
        for name, _, target in found:
            x = xs[name.rsplit(".", 1)[1].removesuffix("_proj")]
            got = modules[name](x)[0]
            want = torch.stack([dict(models[a or "base"].named_modules())[name](x)[0][t] for t, a in enumerate(rows)])
            base = dict(models["base"].named_modules())[name](x)[0]
            report.append({"tp": tp, "rank": rank, "name": name, "parallel": target.parallel,
                           "output_sizes": target.output_sizes, "output_shards": target.output_shards,
                           "input_shard": target.input_shard, "input_size": target.input_size,
                           "diff": float((got - want).abs().max()), "scale": float(want.abs().max()),
                           "jd_effect": float((want - base).abs().max())})
print("REPORT" + json.dumps(report))
"""


@pytest.mark.skipif(not VENV_PYTHON.exists(), reason=f"no vLLM virtualenv at {VENV_PYTHON}: create it with "
                    "`bash .ci/vllm_env.sh` (or set VLLM_JD_PYTHON)")
def test_discovery_on_vllm_layers_matches_merged_weights(tmp_path):
    """`discover_layers` on vLLM's QKV/Merged/Row parallel layers at tp 1, 2 and 4 (2 kv heads: replicated over
    pairs of ranks at tp 4): every rank's JD rows equal that rank's layer loaded by vLLM with W + ΔW."""
    coll = _tp_collection(tmp_path / "collection", LLAMA, 2, "full", n_adapters=2)
    tensors = {}
    for key, weight in coll.weights.items():
        tensors[f"base/{key}"] = weight.contiguous()
        for name in coll.names:
            tensors[f"{name}/{key}"] = (weight + coll.delta(name, key)).contiguous()
    save_file(tensors, str(tmp_path / "weights.safetensors"))
    rows = ["task-0", None, "task-1", "task-1", None, "task-0"]
    args = {"dims": asdict(LLAMA), "weights": str(tmp_path / "weights.safetensors"),
            "root": str(tmp_path / "collection"), "rows": rows, "tp_sizes": [1, 2, 4]}
    proc = subprocess.run([str(VENV_PYTHON), "-c", DISCOVERY_SCRIPT, json.dumps(args)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    assert len(report) == 4 * (1 + 2 + 4)
    for entry in report:
        assert entry["diff"] <= 1e-4 * max(1.0, entry["scale"]), entry
        assert entry["jd_effect"] > 1e-2, entry  # the adapters change every layer's rows
    by_key = {(e["tp"], e["rank"], e["name"].rsplit(".", 1)[1]): e for e in report}
    assert by_key[(4, 3, "qkv_proj")]["output_shards"] == [[3, 4], [1, 2], [1, 2]]  # kv head 1 on ranks 2-3
    assert by_key[(4, 1, "qkv_proj")]["output_shards"] == [[1, 4], [0, 2], [0, 2]]
    assert by_key[(4, 1, "qkv_proj")]["output_sizes"] == [16, 16, 16]
    assert by_key[(2, 1, "gate_up_proj")]["output_shards"] == [[1, 2], [1, 2]]
    down = by_key[(2, 1, "down_proj")]
    assert (down["parallel"], down["input_shard"], down["input_size"]) == (ROW, [1, 2], 64)
    assert by_key[(1, 0, "qkv_proj")]["output_shards"] == [] and by_key[(1, 0, "o_proj")]["input_shard"] == [0, 1]
