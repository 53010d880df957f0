"""PEFT conformance matrix: PEFT's generic expectations for a tuner (save/load, merge/unmerge/safe_merge, delete,
disable, set_adapter, several active adapters, mixed batches, training, dtype casts), for full/diagonal Σ × 1/3
clusters × `nn.Linear` / bitsandbytes 4-bit / 8-bit bases.

Every expected output comes from an independent reference: the model's own base layers (adapters disabled), each
with a forward hook adding `x ΔWᵀ`, `ΔW = U[c] Σ V[c]ᵀ` computed from the raw tensors the collection was written from
(no JD maths). The model's own base layers rather than a copy: bitsandbytes 0.50 on CPU changes a 4-bit model's later
outputs when `state_dict()` is called after a forward (PEFT's `load_adapter`/`save_pretrained` do, for LoRA too), so
only the same modules are comparable.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Sequence
from functools import partial

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from utils import TINY_NAME, dense_delta, make_collection, tiny_llama

import peft_jd
from peft_jd.core import ADAPTER_WEIGHTS_NAME, SIGMA_KEY_SUFFIX


pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(hidden_size=64, intermediate_size=128)


@dataclasses.dataclass(frozen=True)
class Case:
    sigma_type: str
    clusters: int
    base: str  # "linear", "bnb4" or "bnb8"

    def __str__(self) -> str:
        return f"{self.sigma_type}-c{self.clusters}-{self.base}"


CASES = [Case(s, c, b) for b in ("linear", "bnb4", "bnb8") for s in ("full", "diag") for c in (1, 3)]


@pytest.fixture(scope="module")
def bases_models(tmp_path_factory):
    """The fp32 base model, and loaders of its bitsandbytes-quantized versions (loaded once per kind)."""
    base = tiny_llama(**TINY)
    folder = tmp_path_factory.mktemp("base_model")
    base.save_pretrained(folder)
    return {"linear": base, "folder": folder}


def quantized(models: dict, kind: str):
    if kind not in models:
        pytest.importorskip("bitsandbytes")
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
            if kind == "bnb4"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
        model = AutoModelForCausalLM.from_pretrained(models["folder"], quantization_config=quant, device_map="cpu")
        model.config._name_or_path = TINY_NAME
        models[kind] = model.eval()
    return models[kind]


@pytest.fixture(scope="module")
def collections(tmp_path_factory, bases_models):
    """One synthetic collection per (sigma_type, clusters), made once for the module."""
    made = {}

    def get(case: Case):
        key = (case.sigma_type, case.clusters)
        if key not in made:
            root = tmp_path_factory.mktemp(f"coll-{case.sigma_type}-{case.clusters}")
            data = make_collection(
                root, bases_models["linear"], n_adapters=3, r=4, clusters=case.clusters, sigma_type=case.sigma_type
            )
            made[key] = (root, data)
        return made[key]

    return get


@pytest.fixture(params=CASES, ids=str)
def env(request, bases_models, collections):
    """`(case, fresh base model, collection root, raw collection tensors)`."""
    case = request.param
    template = bases_models["linear"] if case.base == "linear" else quantized(bases_models, case.base)
    root, data = collections(case)
    return case, copy.deepcopy(template), root, data


def adapter_dir(root, name: str) -> str:
    return str(root / "adapters" / name)


def _add_delta(module, inputs, output, delta):
    return output + (inputs[0].float() @ delta.T).to(output.dtype)


def reference_logits(model, deltas: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Logits of `model` with its adapters disabled and `x ΔWᵀ` added to each target base layer's output."""
    handles = [
        layer.get_base_layer().register_forward_hook(partial(_add_delta, delta=deltas[key]))
        for key, layer in model.base_model.jd_layers().items()
        if key in deltas
    ]
    try:
        with model.disable_adapter(), torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()


def deltas_of(data: dict, adapters: Sequence[str]) -> dict[str, torch.Tensor]:
    """Module key → Σ_a ΔW_a of the raw collection tensors."""
    if not adapters:
        return {}
    return {key: sum(dense_delta(data, name, key) for name in adapters) for key in data["bases"]}


def logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def tolerance(case: Case) -> dict:
    # bitsandbytes' CPU matmuls round each layer's input (int8 per row for 8-bit, bf16 for 4-bit): the last-bit
    # differences between `x V Σ Uᵀ` and `x ΔWᵀ` can flip such a rounding in the next layer.
    return dict(atol=5e-3, rtol=5e-3) if case.base != "linear" else dict(atol=1e-5, rtol=1e-5)


def load_two(base, root):
    """A model holding task-0 as "default" and task-1 as "b"."""
    model = PeftModel.from_pretrained(base, adapter_dir(root, "task-0"))
    model.load_adapter(adapter_dir(root, "task-1"), adapter_name="b")
    return model


IDS = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(0))


def test_from_pretrained_forward(env):
    case, base, root, data = env
    model = PeftModel.from_pretrained(base, adapter_dir(root, "task-0"))
    expected = reference_logits(model, deltas_of(data, ["task-0"]), IDS)
    torch.testing.assert_close(logits(model, IDS), expected, **tolerance(case))
    assert (expected - reference_logits(model, {}, IDS)).abs().max() > 1e-2  # the adapter does something


def test_save_pretrained_and_reload(env, tmp_path):
    case, base, root, data = env
    model = load_two(copy.deepcopy(base), root)
    model.set_adapter("b")
    before_save = logits(model, IDS)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").is_file()  # PEFT's model-card step needs a real PeftType
    saved = load_file(tmp_path / "b" / ADAPTER_WEIGHTS_NAME)
    assert len(saved) == len(data["bases"]) and all(key.endswith(SIGMA_KEY_SUFFIX) for key in saved)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "b"))
    got = logits(reloaded, IDS)
    torch.testing.assert_close(got, reference_logits(reloaded, deltas_of(data, ["task-1"]), IDS), **tolerance(case))
    if case.base != "bnb4":  # see the module docstring: the saved 4-bit model's own outputs moved
        torch.testing.assert_close(got, before_save, **tolerance(case))


def test_merge_unmerge_and_safe_merge(env):
    case, base, root, data = env
    model = PeftModel.from_pretrained(base, adapter_dir(root, "task-2"))
    layers = model.base_model.jd_layers()
    # Before any forward: bitsandbytes 0.50's CPU 4-bit forward repacks the weight, and dequantizing it afterwards
    # (what merging into any PEFT adapter does) returns wrong values.
    before = {key: layer.get_base_weight().float().clone() for key, layer in layers.items()}
    expected_merged = reference_logits(model, deltas_of(data, ["task-2"]), IDS) if case.base == "linear" else None
    with pytest.warns(UserWarning, match="quantized") if case.base != "linear" else contextlib.nullcontext():
        model.merge_adapter(safe_merge=True)
    for key, layer in layers.items():
        target = before[key] + dense_delta(data, "task-2", key)
        merged = layer.get_base_weight().float()
        if case.base == "linear":
            torch.testing.assert_close(merged, target, atol=1e-6, rtol=0)
        else:  # requantized: within half the widest nf4 step (0.14 · absmax) plus bf16 rounding; int8 is finer
            assert (merged - target).abs().max() <= 0.2 * target.abs().max()
            assert (merged - before[key]).abs().max() > 0.5 * dense_delta(data, "task-2", key).abs().max()
    if case.base == "linear":
        torch.testing.assert_close(logits(model, IDS), expected_merged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert not any(layer.merged for layer in layers.values())
    if case.base == "linear":
        for key, layer in layers.items():
            torch.testing.assert_close(layer.get_base_weight().float(), before[key], atol=1e-6, rtol=0)
    # safe_merge refuses a broken Σ and leaves the weight untouched.
    layer = next(iter(layers.values()))
    with torch.no_grad():
        layer.jd_sigma["default"].fill_(float("nan"))
    weight = layer.get_base_weight().clone()
    with pytest.raises(ValueError, match="NaN"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_weight(), weight) and not layer.merged


def test_delete_adapter_frees_its_slot(env):
    case, base, root, data = env
    model = load_two(base, root)
    tuner = model.base_model
    slot = tuner.slot_table.slot_of["b"]
    model.delete_adapter("b")
    assert "b" not in model.peft_config and "b" not in tuner.slot_table
    for layer in tuner.jd_layers().values():
        assert "b" not in layer.jd_sigma and not torch.count_nonzero(layer.jd_sigma_stack[slot])
    expected = reference_logits(model, deltas_of(data, ["task-0"]), IDS)
    torch.testing.assert_close(logits(model, IDS), expected, **tolerance(case))
    model.load_adapter(adapter_dir(root, "task-2"), adapter_name="c")
    assert tuner.slot_table.slot_of["c"] == slot


def test_disable_adapter_gives_the_base_model(env):
    case, base, root, data = env
    with torch.no_grad():
        base_logits = copy.deepcopy(base)(input_ids=IDS).logits
    model = PeftModel.from_pretrained(base, adapter_dir(root, "task-0"))
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, IDS), base_logits, **tolerance(case))
    assert (logits(model, IDS) - base_logits).abs().max() > 1e-2


def test_set_adapter_and_several_active_adapters(env):
    case, base, root, data = env
    model = load_two(base, root)
    model.set_adapter("b")
    expected = reference_logits(model, deltas_of(data, ["task-1"]), IDS)
    torch.testing.assert_close(logits(model, IDS), expected, **tolerance(case))
    model.base_model.set_adapter(["default", "b"])
    expected = reference_logits(model, deltas_of(data, ["task-0", "task-1"]), IDS)
    torch.testing.assert_close(logits(model, IDS), expected, **tolerance(case))


def test_mixed_batch_rows_equal_their_adapter_alone(env):
    case, base, root, data = env
    model = load_two(base, root)
    names = ["b", "__base__", "default", "b"]
    ids = torch.randint(0, 128, (len(names), 5), generator=torch.Generator().manual_seed(1))
    mixed = logits(model, ids, adapter_names=names)
    for i, name in enumerate(names):
        adapters = {"default": ["task-0"], "b": ["task-1"], "__base__": []}[name]
        expected = reference_logits(model, deltas_of(data, adapters), ids[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], expected, **tolerance(case))


def test_training_steps_update_only_sigma(env):
    case, base, root, data = env
    config = peft_jd.JDLoraConfig(
        r=4,
        sigma_type=case.sigma_type,
        target_modules=["q_proj", "k_proj", "v_proj"],
        bases=str(root / "bases"),
        cluster=case.clusters - 1,
        base_model_name_or_path=TINY_NAME,
    )
    model = get_peft_model(base, config)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".jd_sigma." in n for n in trainable)
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0]
    # The trained Σ are what the batched kernel reads (views of the stack) and what the forward applies.
    tuner, deltas = model.base_model, {}
    for key, layer in tuner.jd_layers().items():
        slot = tuner.slot_table.slot_of["default"]
        assert layer.jd_sigma["default"].data_ptr() == layer.jd_sigma_stack[slot].data_ptr()
        sigma = layer.jd_sigma["default"].detach().float()
        U, V = data["bases"][key]
        c = case.clusters - 1
        deltas[key] = U[c] @ (sigma if sigma.dim() == 2 else torch.diag(sigma)) @ V[c].T
    expected = reference_logits(model, deltas, IDS)
    torch.testing.assert_close(logits(model, IDS), expected, **tolerance(case))
    torch.testing.assert_close(logits(model, IDS, adapter_names=["default"] * 3), expected, **tolerance(case))


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
def test_autocast_adapter_dtype(env, autocast):
    case, base, root, _ = env
    half_base = case.base == "linear"
    if half_base:
        base = base.to(torch.bfloat16)
    model = PeftModel.from_pretrained(base, adapter_dir(root, "task-0"), autocast_adapter_dtype=autocast)
    model.load_adapter(adapter_dir(root, "task-1"), adapter_name="b", autocast_adapter_dtype=autocast)
    # PEFT's convention: the adapter follows the base weight's float dtype, upcast to fp32 by autocast; quantized
    # weights are not float, so Σ stays fp32 there.
    expected = torch.bfloat16 if half_base and not autocast else torch.float32
    for layer in model.base_model.jd_layers().values():
        assert layer.jd_sigma_stack.dtype == expected
        for name in ("default", "b"):
            assert layer.jd_sigma[name].dtype == expected
            assert layer.jd_sigma[name].data_ptr() == layer.jd_sigma_stack[layer.slot_table.slot_of[name]].data_ptr()
    single = logits(model, IDS)
    mixed = logits(model, IDS, adapter_names=["default"] * 3)
    assert torch.isfinite(single).all()
    torch.testing.assert_close(mixed.float(), single.float(), atol=5e-2, rtol=5e-2)
