"""JD weights for TGI without TGI: preparation, sharding, per-token slots and forward vs dense U Σ Vᵀ references."""

from __future__ import annotations

import json

import pytest
import torch
from utils import dense_delta, make_collection, target_linears, tiny_llama

from peft_jd.core import BASE_SLOT, BasesMismatchError, ShapeMismatchError, load_shared_bases
from tgi_patch.adapter_files import load_sigmas, read_spec
from tgi_patch.forward import apply_jd, jd_lora_apply_static
from tgi_patch.state import JDBatchWeights, JDServingState
from tgi_patch.weights import COLUMN, ROW, TargetLayer


NAMES = ["task-0", "task-1", "task-2"]


def _collection(tmp_path, clusters=2, sigma_type="full", seed=0, module_ranks=None):
    model = tiny_llama()
    collection = make_collection(tmp_path, model, n_adapters=3, r=4, clusters=clusters, sigma_type=sigma_type,
                                 seed=seed, module_ranks=module_ranks)
    return model, collection, load_shared_bases(str(tmp_path / "bases"))


def _targets(model, layer_type, parallel=COLUMN):
    layers = sorted(target_linears(model, [layer_type]).items(), key=lambda kv: int(kv[0].split(".")[2]))
    return [TargetLayer(key, parallel, lin.out_features, lin.in_features, torch.device("cpu")) for key, lin in layers]


def _prepare(state, tmp_path, bases, layer_type, targets, names=NAMES, world_size=1, rank=0):
    handles = {}
    for name in names:
        directory = str(tmp_path / "adapters" / name)
        spec = read_spec(name, directory)
        state.use_bases(bases, name)
        sigmas = load_sigmas(spec, directory, bases.config, "bases")
        handles[name] = state.prepare(name, sigmas, spec.cluster_of, layer_type, targets, world_size, rank,
                                      torch.float32)
    return handles


def _reference(collection, key, x, token_adapters, scale=None):
    rows = []
    for t, adapter in enumerate(token_adapters):
        if adapter is None:
            rows.append(torch.zeros(dense_delta(collection, "task-0", key).shape[0]))
        else:
            factor = (scale or {}).get(adapter, 1.0)
            rows.append(factor * dense_delta(collection, adapter, key) @ x[t])
    return torch.stack(rows)


def _bind_tgi_indices(state, handles):
    # TGI numbers adapters in load order; index 1 is a plain LoRA adapter here, JD adapters are 2, 3, 4.
    for offset, name in enumerate(NAMES):
        state.bind(offset + 2, handles[name].slot)


# TGI index per token: base, plain LoRA, then JD adapters, mixed and repeated.
TGI_INDICES = [0, 2, 2, 3, 1, 4, 0, 3, 4, 2]
TOKEN_ADAPTERS = [None, "task-0", "task-0", "task-1", None, "task-2", None, "task-1", "task-2", "task-0"]


# Budgeted collections: the k_proj of layer 1 has rank 2 while the others have 4.
HETEROGENEOUS = {"model.layers.1.self_attn.k_proj": 2}


@pytest.mark.parametrize("clusters,sigma_type,module_ranks", [(1, "full", None), (2, "full", None),
                                                              (2, "diag", None), (2, "full", HETEROGENEOUS),
                                                              (1, "diag", HETEROGENEOUS)])
def test_mixed_batch_matches_dense_reference(tmp_path, clusters, sigma_type, module_ranks):
    model, collection, bases = _collection(tmp_path, clusters, sigma_type, module_ranks=module_ranks)
    state = JDServingState()
    targets = _targets(model, "k_proj")
    handles = _prepare(state, tmp_path, bases, "k_proj", targets)
    # One model-wide slot per adapter; slot 0 (the base model's zero Σ) is never given to an adapter.
    assert len({handles[name].slot for name in NAMES} - {BASE_SLOT}) == len(NAMES)
    _bind_tgi_indices(state, handles)
    slots = state.token_slots(torch.tensor(TGI_INDICES))
    assert slots.tolist() == [0 if a is None else handles[a].slot for a in TOKEN_ADAPTERS]
    batch = JDBatchWeights(state.layer_types["k_proj"], slots)
    torch.manual_seed(1)
    for layer_id, target in enumerate(targets):
        x = torch.randn(len(TGI_INDICES), target.in_features)
        base = torch.randn(len(TGI_INDICES), target.out_features)
        y = base.clone()
        apply_jd(batch, layer_id, x, y)
        expected = base + _reference(collection, target.module_key, x, TOKEN_ADAPTERS)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_scaling_from_config_is_folded_into_sigma(tmp_path):
    model, collection, bases = _collection(tmp_path)
    config_path = tmp_path / "adapters" / "task-1" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["scaling"] = 2.5
    config_path.write_text(json.dumps(config))
    state = JDServingState()
    targets = _targets(model, "q_proj")
    handles = _prepare(state, tmp_path, bases, "q_proj", targets)
    _bind_tgi_indices(state, handles)
    batch = JDBatchWeights(state.layer_types["q_proj"], state.token_slots(torch.tensor(TGI_INDICES)))
    x = torch.randn(len(TGI_INDICES), 64)
    y = apply_jd(batch, 1, x, torch.zeros(len(TGI_INDICES), 64))
    expected = _reference(collection, targets[1].module_key, x, TOKEN_ADAPTERS, scale={"task-1": 2.5})
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_column_parallel_shards_concatenate_to_full_output(tmp_path):
    model, collection, bases = _collection(tmp_path, clusters=2)
    targets = _targets(model, "q_proj")
    x = torch.randn(len(TGI_INDICES), 64)
    outputs = []
    for rank in range(2):
        state = JDServingState()
        handles = _prepare(state, tmp_path, bases, "q_proj", targets, world_size=2, rank=rank)
        _bind_tgi_indices(state, handles)
        layer = state.layer_types["q_proj"]
        assert layer.U.shape == (2, 2, 32, 4) and layer.V.shape == (2, 2, 64, 4)
        batch = JDBatchWeights(layer, state.token_slots(torch.tensor(TGI_INDICES)))
        outputs.append(apply_jd(batch, 0, x, torch.zeros(len(TGI_INDICES), 32)))
    expected = _reference(collection, targets[0].module_key, x, TOKEN_ADAPTERS)
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, rtol=1e-5, atol=1e-5)


def test_row_parallel_layout_keeps_input_shard_of_v_and_full_u(tmp_path):
    model, collection, bases = _collection(tmp_path)
    state = JDServingState()
    _prepare(state, tmp_path, bases, "q_proj", _targets(model, "q_proj", parallel=ROW), world_size=2, rank=1)
    layer = state.layer_types["q_proj"]
    U, V = bases.module("model.layers.0.self_attn.q_proj")
    assert layer.parallel == ROW
    torch.testing.assert_close(layer.U[0], U)
    torch.testing.assert_close(layer.V[0], V[:, 32:])


def test_static_kernel_and_graph_buffer_match_eager(tmp_path):
    model, collection, bases = _collection(tmp_path, clusters=2)
    state = JDServingState()
    targets = _targets(model, "v_proj")
    handles = _prepare(state, tmp_path, bases, "v_proj", targets)
    _bind_tgi_indices(state, handles)
    slots = state.token_slots(torch.tensor(TGI_INDICES))
    U, V, sigma, slot_cluster = state.layer_types["v_proj"].layer(0)
    x = torch.randn(len(TGI_INDICES), 64)
    eager = apply_jd(JDBatchWeights(state.layer_types["v_proj"], slots), 0, x, torch.zeros(len(TGI_INDICES), 32))
    static = jd_lora_apply_static(torch.zeros(len(TGI_INDICES), 32), x, U, V, sigma, slots, slot_cluster)
    torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-5)

    # A graph captured for 16 tokens reads a static buffer; a 10-token batch fills it and pads with slot 0.
    buffer = state.graph_buffer(16, torch.device("cpu"))
    captured = state.batches(buffer)["v_proj"]
    state.fill_graph_buffer(16, slots)
    padded_x = torch.cat([x, torch.randn(6, 64)])
    replay = apply_jd(captured, 0, padded_x, torch.zeros(16, 32), graph_safe=True)
    torch.testing.assert_close(replay[:10], eager, rtol=1e-5, atol=1e-5)
    assert replay[10:].abs().max() == 0
    with pytest.raises(ValueError, match="cannot replay"):
        state.fill_graph_buffer(16, torch.zeros(17, dtype=torch.long))


def test_token_slots_ignore_unbound_and_out_of_range_indices(tmp_path):
    state = JDServingState()
    state.bind(3, 1)
    state.bind(5, 2)
    assert state.token_slots(torch.tensor([0, 1, 3, 5, 9, 4])).tolist() == [0, 0, 1, 2, 0, 0]
    state.unbind(3)
    assert state.token_slots(torch.tensor([3, 5])).tolist() == [0, 2]


def test_layers_missing_from_bases_get_no_update(tmp_path):
    model, collection, bases = _collection(tmp_path)
    targets = _targets(model, "q_proj") + [
        TargetLayer("model.layers.2.self_attn.q_proj", COLUMN, 64, 64, torch.device("cpu"))
    ]
    state = JDServingState()
    handles = _prepare(state, tmp_path, bases, "q_proj", targets)
    _bind_tgi_indices(state, handles)
    batch = JDBatchWeights(state.layer_types["q_proj"], state.token_slots(torch.tensor(TGI_INDICES)))
    assert state.layer_types["q_proj"].num_clusters == [2, 2, 0]
    y = apply_jd(batch, 2, torch.randn(len(TGI_INDICES), 64), torch.zeros(len(TGI_INDICES), 64))
    assert y.abs().max() == 0


def test_adapter_without_sigma_for_layer_type_is_skipped(tmp_path):
    model, collection, bases = _collection(tmp_path)
    state = JDServingState()
    state.use_bases(bases, "task-0")
    o_targets = [TargetLayer(f"model.layers.{i}.self_attn.o_proj", ROW, 64, 64, torch.device("cpu")) for i in (0, 1)]
    assert state.prepare("task-0", {}, lambda key: 0, "o_proj", o_targets, 1, 0, torch.float32) is None
    assert "o_proj" not in state.layer_types


def test_errors_name_module_and_cause(tmp_path):
    model, collection, bases = _collection(tmp_path)
    state = JDServingState()
    wrong = [TargetLayer(t.module_key, COLUMN, 48, t.in_features, t.device) for t in _targets(model, "q_proj")]
    with pytest.raises(ShapeMismatchError, match="model.layers.0.self_attn.q_proj.*output size of 64.*has 48"):
        _prepare(state, tmp_path, bases, "q_proj", wrong)
    with pytest.raises(ShapeMismatchError, match="cannot be split evenly over 3 shards"):
        _prepare(JDServingState(), tmp_path, bases, "q_proj", _targets(model, "q_proj"), world_size=3)

    other_root = tmp_path / "other"
    make_collection(other_root, model, n_adapters=1, r=4, seed=7)
    state = JDServingState()
    state.use_bases(bases, "task-0")
    with pytest.raises(BasesMismatchError, match="already serves bases"):
        state.use_bases(load_shared_bases(str(other_root / "bases")), "task-0-other")

    state = JDServingState()
    handles = _prepare(state, tmp_path, bases, "q_proj", _targets(model, "q_proj"))
    batch = JDBatchWeights(state.layer_types["q_proj"], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="5 input rows but 4 adapter slots"):
        apply_jd(batch, 0, torch.randn(5, 64), torch.zeros(5, 64))
    batch = JDBatchWeights(state.layer_types["q_proj"], torch.full((4,), handles["task-0"].slot))
    with pytest.raises(ShapeMismatchError, match="maps 32 → 64 features"):
        apply_jd(batch, 0, torch.randn(4, 32), torch.zeros(4, 64))


def test_adapters_served_partially_are_reported(tmp_path):
    from peft_jd.core import AdapterFormatError

    model, collection, bases = _collection(tmp_path)
    state = JDServingState()
    directory = str(tmp_path / "adapters" / "task-0")
    spec = read_spec("task-0", directory)
    sigmas = load_sigmas(spec, directory, bases.config, "bases")
    state.expect("task-0", set(sigmas))
    state.use_bases(bases, "task-0")
    slots = {state.prepare("task-0", sigmas, spec.cluster_of, layer_type, _targets(model, layer_type), 1, 0,
                           torch.float32).slot for layer_type in ("q_proj", "k_proj")}
    assert len(slots) == 1  # the same slot in every layer type
    with pytest.raises(AdapterFormatError, match=r"\['task-0'\].*self_attn.v_proj"):
        state.check_served()
    state.prepare("task-0", sigmas, spec.cluster_of, "v_proj", _targets(model, "v_proj"), 1, 0, torch.float32)
    state.check_served()


class _TwoShardsOneProcess:
    """A process group of size 2 whose all-reduce is the identity: with the full input on 'one shard', the split
    update (shrink+Σ, all-reduce, expand) must equal the direct one."""

    def size(self):
        return 2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_row_parallel_split_update_matches_direct_update(tmp_path, monkeypatch, backend):
    if backend == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available():
            import importlib

            from peft_jd.kernels import triton_kernels, triton_ops

            monkeypatch.setenv("TRITON_INTERPRET", "1")
            if not triton_ops.interpreter_enabled():
                importlib.reload(triton_kernels)
    monkeypatch.setenv("PEFT_JD_KERNEL", backend)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, group=None: tensor)
    model, collection, bases = _collection(tmp_path, clusters=2)
    state = JDServingState()
    handles = _prepare(state, tmp_path, bases, "q_proj", _targets(model, "q_proj", parallel=ROW))
    _bind_tgi_indices(state, handles)
    batch = JDBatchWeights(state.layer_types["q_proj"], state.token_slots(torch.tensor(TGI_INDICES)))
    x = torch.randn(len(TGI_INDICES), 64)
    for graph_safe in (False, True):
        split = apply_jd(batch, 0, x, torch.zeros(len(TGI_INDICES), 64), _TwoShardsOneProcess(), graph_safe)
        expected = _reference(collection, "model.layers.0.self_attn.q_proj", x, TOKEN_ADAPTERS)
        torch.testing.assert_close(split, expected, rtol=1e-4, atol=1e-4)


def test_half_precision_model_dtype(tmp_path):
    model, collection, bases = _collection(tmp_path, clusters=2)
    state = JDServingState()
    targets = _targets(model, "q_proj")
    for name in NAMES:
        directory = str(tmp_path / "adapters" / name)
        spec = read_spec(name, directory)
        state.use_bases(bases, name)
        state.bind(NAMES.index(name) + 2, state.prepare(name, load_sigmas(spec, directory, bases.config, "bases"),
                                                        spec.cluster_of, "q_proj", targets, 1, 0,
                                                        torch.bfloat16).slot)
    layer = state.layer_types["q_proj"]
    layer.materialize()
    assert layer.U.dtype == torch.bfloat16 and layer.sigma.dtype == torch.float32
    x = torch.randn(len(TGI_INDICES), 64)
    batch = JDBatchWeights(layer, state.token_slots(torch.tensor(TGI_INDICES)))
    y = apply_jd(batch, 0, x.bfloat16(), torch.zeros(len(TGI_INDICES), 64, dtype=torch.bfloat16))
    expected = _reference(collection, "model.layers.0.self_attn.q_proj", x, TOKEN_ADAPTERS)
    torch.testing.assert_close(y.float(), expected, rtol=5e-2, atol=5e-2)
