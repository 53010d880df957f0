"""The vLLM plugin's JD layer (vllm_jd.store / vllm_jd.ops) against the dense reference W x + U Σ Vᵀ x.

These run in the main environment: the layer code imports only torch and the PEFT-free core, not vLLM. A packed
`qkv_proj`-like layer (vLLM's fused q/k/v) is emulated by a module returning `(output, bias)` as vLLM's linear layers
do; rows of a step mix JD adapters, a plain LoRA (added by the inner module, as vLLM's own LoRA wrapper would) and
base rows, in prefill (runs of tokens per sequence) and decode (one token per sequence) layouts.
"""

from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import save_file
from utils import TARGETS, dense_delta, make_collection, tiny_llama

from peft_jd.core import BASE_SLOT, load_shared_bases
from peft_jd.core.errors import AdapterFormatError, BasesMismatchError, UnknownAdapterError
from vllm_jd.adapters import JDAdapterRef, locate_jd_adapter, read_checked_sigmas
from vllm_jd.frontend import FrontendRegistry
from vllm_jd.ops import install_jd_update, set_current_store
from vllm_jd.plugin import check_vllm_version
from vllm_jd.store import JDStore, LayerTarget


PREFIX = "model.layers.0.self_attn"


class FakeLinearMethod:
    """vLLM's unquantized linear method: `apply(layer, x, bias)` is the layer's local matmul."""

    def apply(self, layer, x, bias=None):
        y = x @ layer.weight.T
        return y if bias is None else y + bias


class FakeQKV(torch.nn.Module):
    """vLLM-style packed q/k/v projection: returns `(x Wᵀ, None)`, its matmul in `quant_method.apply`; rows flagged
    `plain` then get a plain LoRA B A x (as vLLM's LoRA wrapper adds it after `apply`)."""

    def __init__(self, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, method=None):
        super().__init__()
        self.weight, self.lora_a, self.lora_b = weight, lora_a, lora_b
        self.quant_method = method or FakeLinearMethod()
        self.plain_rows = torch.zeros(0, dtype=torch.bool)

    def forward(self, x):
        y = self.quant_method.apply(self, x, None)
        if self.plain_rows.any():
            y[self.plain_rows] += (x[self.plain_rows] @ self.lora_a.T) @ self.lora_b.T
        return y, None


# One cluster: q/k/v fused into one rank-3r projection (block-diagonal U and Σ); two clusters: one per module.
# "ranks": a budgeted collection whose k_proj has rank 2 while q/v have 4 (fused: blocks of ranks 4, 2, 4).
@pytest.fixture(scope="module", params=[("full", 2), ("diag", 2), ("full", 1), ("diag", 1), ("full", 1, "ranks"),
                                        ("diag", 2, "ranks")], ids=str)
def setup(request, tmp_path_factory, single_thread):
    sigma_type, clusters = request.param[:2]
    module_ranks = {f"{PREFIX}.k_proj": 2} if len(request.param) > 2 else None
    root = tmp_path_factory.mktemp(f"coll-{sigma_type}-{clusters}")
    model = tiny_llama()
    collection = make_collection(root, model, n_adapters=5, r=4, clusters=clusters, sigma_type=sigma_type,
                                 module_ranks=module_ranks)
    attn = model.model.layers[0].self_attn
    linears = [getattr(attn, name) for name in TARGETS]
    weight = torch.cat([lin.weight.detach() for lin in linears])
    gen = torch.Generator().manual_seed(1)
    lora_a, lora_b = torch.randn(2, 64, generator=gen), torch.randn(weight.shape[0], 2, generator=gen)
    store = JDStore(initial_capacity=2)
    target = LayerTarget(f"{PREFIX}.qkv_proj", tuple(f"{PREFIX}.{t}" for t in TARGETS),
                         tuple(lin.out_features for lin in linears))
    layer_id = store.add_layer(target)
    # A layer the bases do not cover (o_proj): it must stay untouched.
    uncovered_id = store.add_layer(LayerTarget(f"{PREFIX}.o_proj", (f"{PREFIX}.o_proj",), (64,)))
    bases = load_shared_bases(str(root / "bases"))
    store.attach_bases(bases)
    slots = {}
    for name in ("task-0", "task-1", "task-3", "task-4"):  # 4 adapters past an initial capacity of 2: the stack grows
        ref = JDAdapterRef(name, len(slots) + 1, str(root / "adapters" / name))
        spec = ref.spec()
        sigmas = read_checked_sigmas(spec, ref.directory, bases.config, "test bases")
        slots[name] = store.load(ref.key, sigmas, {k: spec.cluster_of(k) for k in sigmas}, spec.scaling)
    qkv = FakeQKV(weight, lora_a, lora_b)
    install_jd_update(qkv, layer_id)
    set_current_store(store)
    yield types.SimpleNamespace(clusters=clusters, root=root, collection=collection, store=store, qkv=qkv, slots=slots,
                                bases=bases, uncovered_id=uncovered_id, linears=linears, lora=(lora_a, lora_b))
    set_current_store(None)


def _reference(s, x, row_adapters, plain_rows):
    """Row by row: W x, plus the plain LoRA for plain rows, plus the dense JD ΔW x of the row's adapter."""
    out = x @ s.qkv.weight.T
    lora_a, lora_b = s.lora
    for t, adapter in enumerate(row_adapters):
        if plain_rows[t]:
            out[t] += lora_b @ (lora_a @ x[t])
        if adapter is not None:
            out[t] += torch.cat([dense_delta(s.collection, adapter, f"{PREFIX}.{name}") @ x[t] for name in TARGETS])
    return out


def _run(s, row_adapters, plain_rows):
    x = torch.randn(len(row_adapters), 64, generator=torch.Generator().manual_seed(len(row_adapters)))
    s.store.set_token_slots([BASE_SLOT if a is None else s.slots[a] for a in row_adapters])
    s.qkv.plain_rows = torch.tensor(plain_rows)
    y, _ = s.qkv(x)
    return y, _reference(s, x, row_adapters, plain_rows)


def test_prefill_mixed_rows(setup):
    # Three sequences of 3, 2 and 4 tokens (JD, plain LoRA, JD of another cluster), then a base sequence of 2.
    rows = ["task-0"] * 3 + [None] * 2 + ["task-1"] * 4 + [None] * 2
    plain = [False] * 3 + [True] * 2 + [False] * 6
    y, ref = _run(setup, rows, plain)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_decode_mixed_rows(setup):
    rows = ["task-3", None, "task-0", "task-4", None, "task-3", "task-1"]
    plain = [False, True, False, False, False, False, False]
    y, ref = _run(setup, rows, plain)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_base_only_step_is_untouched_and_padding_takes_base_slot(setup):
    s = setup
    x = torch.randn(4, 64)
    s.store.set_token_slots([BASE_SLOT] * 4)
    s.qkv.plain_rows = torch.zeros(4, dtype=torch.bool)
    torch.testing.assert_close(s.qkv(x)[0], x @ s.qkv.weight.T)
    # vLLM may pad a batch past its scheduled tokens: the padded rows get no update.
    s.store.set_token_slots([s.slots["task-0"]] * 2)
    y = s.qkv(x)[0]
    ref = _reference(s, x, ["task-0", "task-0", None, None], [False] * 4)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_uncovered_layer_and_unload(setup):
    s = setup
    y = torch.zeros(3, 64)
    s.store.set_token_slots([s.slots["task-0"]] * 3)
    torch.ops.vllm_jd.apply_(y, torch.randn(3, 64), s.uncovered_id)
    assert not y.any()
    key = JDAdapterRef("task-4", 4, str(s.root / "adapters" / "task-4")).key
    slot = s.store.slot_of(key)
    s.store.unload(key)
    assert s.store.slot_of(key) is None
    assert all(not p.sigma[slot].any() for p in s.store.projections())
    spec = JDAdapterRef("task-4", 4, str(s.root / "adapters" / "task-4")).spec()
    sigmas = read_checked_sigmas(spec, str(s.root / "adapters" / "task-4"), s.bases.config, "b")
    assert s.store.load(key, sigmas, {k: spec.cluster_of(k) for k in sigmas}, spec.scaling) == slot


def test_compiled_forward_reads_slots_at_run_time(setup):
    # vLLM's CPU build traces the model once: slots changing between steps must not be baked into the graph.
    s = setup
    s.qkv.plain_rows = torch.zeros(3, dtype=torch.bool)
    compiled = torch.compile(lambda x: s.qkv(x)[0], backend="aot_eager", fullgraph=False, dynamic=False)
    x = torch.randn(3, 64)
    for rows in (["task-0", None, "task-1"], ["task-3", "task-3", None], [None, None, None]):
        s.store.set_token_slots([BASE_SLOT if a is None else s.slots[a] for a in rows])
        torch.testing.assert_close(compiled(x), _reference(s, x, rows, [False] * 3), rtol=1e-4, atol=1e-4)


def test_memory_is_bases_once_plus_sigma_rows(setup):
    s = setup
    sizes = s.store.nbytes()
    if s.clusters == 1:  # fused: U (out_q + out_k + out_v, r_q + r_k + r_v) block diagonal, V (in, same)
        outs = sum(lin.out_features for lin in s.linears)
        rank = sum(s.bases.config.rank_of(f"{PREFIX}.{name}") for name in TARGETS)
        expected_bases = (outs * rank + 64 * rank) * 4
        assert len(list(s.store.projections())) == 1
    else:
        expected_bases = sum(sum(t.nbytes for t in s.bases.tensors[f"{PREFIX}.{name}"]) for name in TARGETS)
        assert len(list(s.store.projections())) == 3
    assert sizes["bases"] == expected_bases
    per_row = sum(p.sigma[0].nbytes + 8 for p in s.store.projections())
    assert sizes["sigma"] == per_row * s.store.allocator.capacity


def test_second_bases_collection_is_refused(setup, tmp_path):
    other = tmp_path / "other"
    make_collection(other, tiny_llama(), n_adapters=1, r=4, sigma_type="full", seed=5)
    with pytest.raises(BasesMismatchError, match="one server per collection"):
        setup.store.attach_bases(load_shared_bases(str(other / "bases")))


def test_locate_and_frontend_validation(setup, tmp_path):
    root = setup.root
    assert locate_jd_adapter("task-2", str(root)).directory == str((root / "adapters" / "task-2").resolve())
    assert locate_jd_adapter("anything", str(root / "adapters" / "task-2")) is not None
    assert locate_jd_adapter("anything", str(root / "adapters" / "task-2"), collection_only=True) is None
    with pytest.raises(UnknownAdapterError, match="no adapter 'missing'"):
        locate_jd_adapter("missing", str(root))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    assert locate_jd_adapter("plain", str(plain)) is None

    registry = FrontendRegistry()
    request = types.SimpleNamespace(lora_name="task-2", lora_int_id=7, lora_path=str(root))
    assert registry.inspect(request).name == "task-2"
    assert registry.inspect(types.SimpleNamespace(lora_name="plain", lora_int_id=8, lora_path=str(plain))) is None
    # A corrupt Σ (NaN) is refused with the core's error, and nothing is recorded.
    sigma_shape = JDAdapterRef("task-2", 0, str(root / "adapters" / "task-2")).spec().sigma_shape()
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({f"base_model.model.{PREFIX}.q_proj.jd_sigma": torch.full(sigma_shape, float("nan"))},
              str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text(
        (root / "adapters" / "task-2" / "adapter_config.json").read_text().replace("../../bases", str(root / "bases"))
    )
    with pytest.raises(AdapterFormatError):
        registry.inspect(types.SimpleNamespace(lora_name="bad", lora_int_id=9, lora_path=str(bad)))
    with pytest.raises(AdapterFormatError):
        registry.inspect(types.SimpleNamespace(lora_name="bad", lora_int_id=9, lora_path=str(bad)))


def test_version_pin():
    check_vllm_version("0.32.0")
    check_vllm_version("0.32.3+cpu")
    with pytest.raises(RuntimeError, match="supports vLLM >= 0.32, < 0.33"):
        check_vllm_version("0.31.2")
    with pytest.raises(RuntimeError, match="VLLM_JD_ALLOW_UNTESTED"):
        check_vllm_version("0.33.0")


def test_bfloat16_model_keeps_sigma_in_bfloat16(setup):
    """A bf16 model: U, V and Σ in bf16 (vLLM's own LoRA precision), still the dense reference within bf16 error."""
    s = setup
    store = JDStore(initial_capacity=4, dtype=torch.bfloat16)
    layer_id = store.add_layer(LayerTarget(f"{PREFIX}.qkv_proj", tuple(f"{PREFIX}.{t}" for t in TARGETS),
                                           tuple(lin.out_features for lin in s.linears)))
    store.attach_bases(s.bases)
    assert all(p.sigma.dtype == torch.bfloat16 and p.U.dtype == torch.bfloat16 for p in store.projections())
    ref = JDAdapterRef("task-1", 1, str(s.root / "adapters" / "task-1"))
    spec = ref.spec()
    sigmas = read_checked_sigmas(spec, ref.directory, s.bases.config, "b")
    slot = store.load(ref.key, sigmas, {k: spec.cluster_of(k) for k in sigmas}, spec.scaling)
    x = torch.randn(5, 64)
    y = torch.zeros(5, s.qkv.weight.shape[0], dtype=torch.bfloat16)
    store.set_token_slots([slot, BASE_SLOT, slot, slot, BASE_SLOT])
    store.apply(y, x.to(torch.bfloat16), layer_id)
    want = _reference(s, x, ["task-1", None, "task-1", "task-1", None], [False] * 5) - x @ s.qkv.weight.T
    torch.testing.assert_close(y.float(), want, rtol=0.05, atol=0.05 * float(want.abs().max()))


def test_cpu_lora_fix_zeroes_rows_without_lora():
    """vLLM's CPU `bgmv_shrink` gathers `weights[-1]` (the last slot) for tokens without LoRA; the fix zeroes them."""
    from vllm_jd.vllm_fixes import masked_bgmv_shrink

    def vllm_bgmv_shrink(inputs, weights, output, indices, scaling=1.0):  # as in vllm/lora/ops/torch_ops (0.32)
        output[:, : weights.shape[-2]] = scaling * torch.einsum("bi,boi->bo", inputs, weights[indices])

    weights, x = torch.randn(2, 3, 5), torch.randn(4, 5)
    indices = torch.tensor([0, -1, 1, -1])
    out = torch.full((4, 3), 7.0)
    masked_bgmv_shrink(vllm_bgmv_shrink)(x, weights, out, indices, 2.0)
    torch.testing.assert_close(out[0], 2.0 * weights[0] @ x[0])
    torch.testing.assert_close(out[2], 2.0 * weights[1] @ x[2])
    assert not out[1].any() and not out[3].any()


def test_quant_method_shared_by_layers_serves_each_its_own_update(setup):
    """vLLM may share one quant method between layers: the layer id comes from the `layer` argument of `apply`."""
    s = setup
    method = FakeLinearMethod()
    first = FakeQKV(s.qkv.weight, *s.lora, method=method)
    second = FakeQKV(torch.randn_like(s.qkv.weight), *s.lora, method=method)
    store = JDStore(initial_capacity=4)
    target = LayerTarget(f"{PREFIX}.qkv_proj", tuple(f"{PREFIX}.{t}" for t in TARGETS),
                         tuple(lin.out_features for lin in s.linears))
    install_jd_update(first, store.add_layer(target))
    install_jd_update(second, store.add_layer(LayerTarget("other", ("not-in-bases",), (s.qkv.weight.shape[0],))))
    store.attach_bases(s.bases)
    ref = JDAdapterRef("task-0", 1, str(s.root / "adapters" / "task-0"))
    spec = ref.spec()
    sigmas = read_checked_sigmas(spec, ref.directory, s.bases.config, "b")
    slot = store.load(ref.key, sigmas, {k: spec.cluster_of(k) for k in sigmas}, spec.scaling)
    x = torch.randn(2, 64)
    set_current_store(store)
    try:
        store.set_token_slots([slot, slot])
        torch.testing.assert_close(first(x)[0], _reference(s, x, ["task-0"] * 2, [False] * 2), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(second(x)[0], x @ second.weight.T)  # not covered: no update
    finally:
        set_current_store(s.store)
