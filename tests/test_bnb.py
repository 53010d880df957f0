"""JD-LoRA on a bitsandbytes 4-bit (nf4) / 8-bit base, on CPU, against a dequantized-base reference."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from utils import dense_delta, make_collection, target_linears, tiny_llama


bnb = pytest.importorskip("bitsandbytes")
from peft.utils.integrations import dequantize_bnb_weight  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402


@pytest.fixture(scope="module")
def quantized_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bnb")
    base = tiny_llama(hidden_size=128, intermediate_size=256)
    base.save_pretrained(root / "model")
    data = make_collection(root / "coll", base, n_adapters=2, r=4, clusters=2, base_model="tiny-llama")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(root / "model", quantization_config=quant, device_map="cpu")
    model.config._name_or_path = "tiny-llama"
    return root, data, base, model


def dequantized_copy(quantized, template):
    """fp32 model whose linear weights are the dequantized 4-bit weights."""
    reference = copy.deepcopy(template)
    modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, lin in reference.named_modules():
            source = modules.get(name)
            if isinstance(lin, torch.nn.Linear) and isinstance(source, bnb.nn.Linear4bit):
                lin.weight.copy_(dequantize_bnb_weight(source.weight, state=source.weight.quant_state).float())
    return reference


def with_delta(model, data, adapter):
    model = copy.deepcopy(model)
    with torch.no_grad():
        for key, lin in target_linears(model).items():
            lin.weight += dense_delta(data, adapter, key)
    return model


def assert_layers_add_dense_delta(model, data, adapter, base_layer_type, tol):
    """Every JD layer of `model` wraps a `base_layer_type` and adds to its output exactly `adapter`'s dense ΔW."""
    with torch.no_grad():
        for key, layer in model.base_model.jd_layers().items():
            assert isinstance(layer.get_base_layer(), base_layer_type)
            x_in = torch.randn(4, layer.in_features)
            expected = layer.get_base_layer()(x_in) + x_in @ dense_delta(data, adapter, key).T
            torch.testing.assert_close(layer(x_in), expected, atol=tol, rtol=tol)


def test_4bit_layer_update_equals_dense_delta(quantized_setup):
    root, data, _, quantized = quantized_setup
    model = PeftModel.from_pretrained(copy.deepcopy(quantized), str(root / "coll" / "adapters" / "task-0"))
    assert_layers_add_dense_delta(model, data, "task-0", bnb.nn.Linear4bit, tol=1e-5)


def test_4bit_mixed_batch_matches_rows_alone_and_dequantized_reference(quantized_setup):
    root, data, base, quantized = quantized_setup
    reference_base = dequantized_copy(quantized, base)
    model = PeftModel.from_pretrained(copy.deepcopy(quantized), str(root / "coll" / "adapters" / "task-0"))
    model.load_adapter(str(root / "coll" / "adapters" / "task-1"), adapter_name="task-1")
    ids = torch.randint(0, 128, (3, 6))
    names = ["default", "__base__", "task-1"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for i, name in enumerate(names):
            alone = model(input_ids=ids[i : i + 1], adapter_names=[name]).logits
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)
        for i, adapter in enumerate(["task-0", None, "task-1"]):
            ref = reference_base if adapter is None else with_delta(reference_base, data, adapter)
            # bitsandbytes' CPU 4-bit matmul rounds differently from x @ dequantize(W)ᵀ (~3e-3 per layer).
            torch.testing.assert_close(mixed[i : i + 1], ref(input_ids=ids[i : i + 1]).logits, atol=3e-2, rtol=0)
        with model.disable_adapter():
            base_logits = model(input_ids=ids[1:2]).logits
    torch.testing.assert_close(mixed[1:2], base_logits, atol=1e-6, rtol=0)
    assert (mixed[0] - base_logits[0]).abs().max() > 0.1


def test_4bit_merge_requantizes_w_plus_delta(quantized_setup):
    root, data, _, quantized = quantized_setup
    model = PeftModel.from_pretrained(copy.deepcopy(quantized), str(root / "coll" / "adapters" / "task-1"))
    layers = model.base_model.jd_layers()
    before = {key: layer.get_base_weight().float().clone() for key, layer in layers.items()}
    with pytest.warns(UserWarning, match="quantized"):
        model.merge_adapter()
    for key, layer in layers.items():
        target = before[key] + dense_delta(data, "task-1", key)
        merged = layer.get_base_weight().float()
        # nf4 has 16 levels per block scaled by the block's absmax: rounding error ≤ ~0.15 · absmax.
        assert (merged - target).abs().max() <= 0.15 * target.abs().max()
        assert (merged - before[key]).abs().max() > 0.5 * dense_delta(data, "task-1", key).abs().max()
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        merged_logits = model(input_ids=ids).logits
    assert torch.isfinite(merged_logits).all()


def test_8bit_layer_update_equals_dense_delta(quantized_setup, tmp_path):
    root, data, _, _ = quantized_setup
    quant = BitsAndBytesConfig(load_in_8bit=True)
    model8 = AutoModelForCausalLM.from_pretrained(root / "model", quantization_config=quant, device_map="cpu")
    model8.config._name_or_path = "tiny-llama"
    model = PeftModel.from_pretrained(model8, str(root / "coll" / "adapters" / "task-0"))
    assert_layers_add_dense_delta(model, data, "task-0", bnb.nn.Linear8bitLt, tol=1e-4)
