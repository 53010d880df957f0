"""CUDA-graph path of the patch, on CPU with stand-ins for TGI's classes: capture reads the static slot buffer, and
the patched `FlashCausalLM.forward` refills it before each replay. A "replay" re-runs the recorded JD updates on the
same tensors, which is what a CUDA graph does with its captured kernels."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from utils import dense_delta, make_collection, tiny_llama

from peft_jd.core import load_shared_bases
from tgi_patch import patches
from tgi_patch.adapter_files import load_sigmas, read_spec
from tgi_patch.forward import apply_jd
from tgi_patch.state import JDBatchWeights, get_state, reset_state
from tgi_patch.weights import COLUMN, TargetLayer


GRAPH_SIZE = 8


class FakeLoraLinear:
    """TGI's `LoraLinear` as the patch sees it: `forward_layer_type` returns `result` when there is no adapter data."""

    layer_id = 1
    process_group = None

    def forward_layer_type(self, result, input, adapter_data, layer_type, start_idx, end_idx):
        return result


class FakeFlashCausalLM:
    """Captures 'graphs' as recorded JD updates on static tensors and replays them."""

    def __init__(self, layer):
        self.layer = layer
        self.device = torch.device("cpu")
        self.cuda_graphs = {}
        self.static_x = torch.zeros(GRAPH_SIZE, 64)
        self.static_out = torch.zeros(GRAPH_SIZE, 64)

    def cuda_graph_warmup(self, bs, max_s, max_bt):
        recorded = []
        original = patches.apply_jd
        patches.apply_jd = lambda *args, **kwargs: recorded.append((args, kwargs)) or original(*args, **kwargs)
        try:  # TGI runs the model with adapter_data=None while capturing
            self.layer.forward_layer_type(self.static_out[:bs], self.static_x[:bs], None, "q_proj", 0, 64)
        finally:
            patches.apply_jd = original
        self.cuda_graphs[bs] = {"recorded": recorded}

    def forward(self, batch, adapter_data):
        tokens = batch.input_ids.shape[0]
        graph = self.cuda_graphs[min(size for size in self.cuda_graphs if size >= tokens)]
        self.static_x[:tokens] = batch.x
        self.static_out.zero_()
        for args, kwargs in graph["recorded"]:
            apply_jd(*args, **kwargs)
        return self.static_out[:tokens].clone()


@pytest.fixture
def served(tmp_path):
    collection = make_collection(tmp_path, tiny_llama(), n_adapters=3, r=4, clusters=2)
    bases = load_shared_bases(str(tmp_path / "bases"))
    reset_state()
    state = get_state()
    targets = [TargetLayer(f"model.layers.{i}.self_attn.q_proj", COLUMN, 64, 64, torch.device("cpu")) for i in (0, 1)]
    for index, name in enumerate(["task-0", "task-1", "task-2"], start=2):
        directory = str(tmp_path / "adapters" / name)
        spec = read_spec(name, directory)
        state.use_bases(bases, name)
        sigmas = load_sigmas(spec, directory, bases.config, "bases")
        handle = state.prepare(name, sigmas, spec.cluster_of, "q_proj", targets, 1, 0, torch.float32)
        state.bind(index, handle.slot)
    state.finish_loading()
    layers_module = SimpleNamespace(LoraLinear=type("LoraLinear", (FakeLoraLinear,), {}))
    flash_module = SimpleNamespace(FlashCausalLM=type("FlashCausalLM", (FakeFlashCausalLM,), {}))
    patches.patch_layers_lora(layers_module)
    patches.patch_flash_causal_lm(flash_module)
    yield collection, state, layers_module, flash_module
    reset_state()


def test_decode_graph_replays_with_each_batch_slots(served):
    collection, state, layers_module, flash_module = served
    model = flash_module.FlashCausalLM(layers_module.LoraLinear())
    model.cuda_graph_warmup(GRAPH_SIZE, 16, 4)
    (args, kwargs), = model.cuda_graphs[GRAPH_SIZE]["recorded"]
    assert kwargs["graph_safe"] and args[0].token_slots is state.graph_slots[GRAPH_SIZE]

    key = "model.layers.1.self_attn.q_proj"
    for tgi_indices, names in [([2, 0, 4], ["task-0", None, "task-2"]),
                               ([3, 3, 1, 2, 4], ["task-1", "task-1", None, "task-0", "task-2"])]:
        x = torch.randn(len(tgi_indices), 64)
        indices = torch.tensor(tgi_indices)
        slots = state.token_slots(indices)
        adapter_data = SimpleNamespace(jd_batches={"q_proj": JDBatchWeights(state.layer_types["q_proj"], slots)},
                                       meta=SimpleNamespace(adapter_set=set(tgi_indices)), data={})
        batch = SimpleNamespace(cu_seqlen_prefill=None, input_ids=torch.zeros(len(tgi_indices)), x=x)
        out = model.forward(batch, adapter_data)
        expected = torch.stack([torch.zeros(64) if a is None else dense_delta(collection, a, key) @ x[t]
                                for t, a in enumerate(names)])
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert state.graph_slots[GRAPH_SIZE][len(tgi_indices):].abs().max() == 0


def test_prefill_and_eager_steps_do_not_touch_graph_buffers(served):
    collection, state, layers_module, flash_module = served
    model = flash_module.FlashCausalLM(layers_module.LoraLinear())
    model.cuda_graph_warmup(GRAPH_SIZE, 16, 4)
    buffer = state.graph_slots[GRAPH_SIZE]
    assert patches.fill_graph_slots(model, SimpleNamespace(jd_batches={}), state) is None
    big = JDBatchWeights(state.layer_types["q_proj"], torch.ones(GRAPH_SIZE + 1, dtype=torch.long))
    assert patches.fill_graph_slots(model, SimpleNamespace(jd_batches={"q_proj": big}), state) is None
    assert buffer.abs().max() == 0
    layer = layers_module.LoraLinear()
    x, slots = torch.randn(3, 64), state.token_slots(torch.tensor([2, 3, 0]))
    adapter_data = SimpleNamespace(jd_batches={"q_proj": JDBatchWeights(state.layer_types["q_proj"], slots)})
    result = layer.forward_layer_type(torch.zeros(3, 64), x, adapter_data, "q_proj", 0, 64)
    key = "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(result[0], dense_delta(collection, "task-0", key) @ x[0], rtol=1e-5, atol=1e-5)
    assert result[2].abs().max() == 0
