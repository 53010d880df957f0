"""PEFT conformance beyond the matrix: `modules_to_save` (saved, loaded, bulk-loaded, mixed-batched and exported,
against PEFT's own LoRA + `modules_to_save` as reference) and PEFT's generic code paths that read `peft_type`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.hotswap import hotswap_adapter
from peft.utils.peft_types import PeftType
from safetensors.torch import load_file, save_file
from utils import TARGETS, TINY_NAME, make_collection, tiny_llama

import peft_jd
from peft_jd.core import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME


pytestmark = pytest.mark.usefixtures("single_thread")

HEAD_KEY = "base_model.model.lm_head.weight"
CLUSTER = 1


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    root = tmp_path_factory.mktemp("mts")
    data = make_collection(root, tiny_llama(), n_adapters=2, r=4, clusters=2)
    return root, data


def write_head_adapter(root, out, seed: int) -> dict:
    """A JD adapter with `modules_to_save=["lm_head"]`, trained-looking Σ and head, written by PEFT's save_pretrained;
    returns its raw tensors."""
    config = peft_jd.JDLoraConfig(
        r=4,
        target_modules=TARGETS,
        bases=str(root / "bases"),
        cluster=CLUSTER,
        base_model_name_or_path=TINY_NAME,
        modules_to_save=["lm_head"],
    )
    model = get_peft_model(tiny_llama(), config)
    gen = torch.Generator().manual_seed(seed)
    sigmas = {}
    with torch.no_grad():
        for key, layer in model.base_model.jd_layers().items():
            sigmas[key] = 0.5 * torch.randn(4, 4, generator=gen)
            layer.jd_sigma["default"].copy_(sigmas[key])
        head = 0.05 * torch.randn(model.base_model.model.lm_head.weight.shape, generator=gen)
        model.base_model.model.lm_head.modules_to_save["default"].weight.copy_(head)
    model.save_pretrained(out)
    return {"sigmas": sigmas, "head": head}


def lora_reference(data: dict, adapter: dict):
    """PEFT's own LoRA with modules_to_save=["lm_head"]: A = V[c]ᵀ, B = U[c] Σ, the head copied (no JD code)."""
    config = LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, modules_to_save=["lm_head"])
    model = get_peft_model(tiny_llama(), config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                key = name.removeprefix("base_model.model.")
                U, V = data["bases"][key]
                module.lora_A["default"].weight.copy_(V[CLUSTER].T)
                module.lora_B["default"].weight.copy_(U[CLUSTER] @ adapter["sigmas"][key])
        model.base_model.model.lm_head.modules_to_save["default"].weight.copy_(adapter["head"])
    return model.eval()


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


IDS = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(0))


def test_modules_to_save_round_trip_equals_peft_lora(coll, tmp_path):
    root, data = coll
    adapter = write_head_adapter(root, tmp_path / "head", seed=1)
    saved = load_file(tmp_path / "head" / ADAPTER_WEIGHTS_NAME)
    torch.testing.assert_close(saved[HEAD_KEY], adapter["head"])  # stored whole, under PEFT's own key
    assert json.loads((tmp_path / "head" / ADAPTER_CONFIG_NAME).read_text())["modules_to_save"] == ["lm_head"]
    model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "head"))
    torch.testing.assert_close(logits(model, IDS), logits(lora_reference(data, adapter), IDS), atol=1e-5, rtol=1e-5)


def test_modules_to_save_in_mixed_batches(coll, tmp_path):
    root, data = coll
    adapter = write_head_adapter(root, tmp_path / "head", seed=2)
    model = PeftModel.from_pretrained(tiny_llama(), str(root / "adapters" / "task-0"))
    model.load_adapter(str(tmp_path / "head"), adapter_name="h")
    names = ["h", "default", "__base__", "h"]
    ids = torch.randint(0, 128, (len(names), 5), generator=torch.Generator().manual_seed(3))
    mixed = logits(model, ids, adapter_names=names)
    reference = lora_reference(data, adapter)
    for i in (0, 3):
        torch.testing.assert_close(mixed[i : i + 1], logits(reference, ids[i : i + 1]), atol=1e-5, rtol=1e-5)
    model.set_adapter("default")  # the adapter without its own head uses the original one
    torch.testing.assert_close(mixed[1:2], logits(model, ids[1:2]), atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(mixed[2:3], logits(model, ids[2:3]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one name per sequence"):
        logits(model, ids, adapter_names=names[:2])


def test_bulk_load_of_modules_to_save_is_all_or_nothing(coll, tmp_path):
    root, data = coll
    adapter = write_head_adapter(root, tmp_path / "good", seed=4)
    write_head_adapter(root, tmp_path / "bad", seed=5)
    tensors = load_file(tmp_path / "bad" / ADAPTER_WEIGHTS_NAME)
    tensors[HEAD_KEY] = tensors[HEAD_KEY][:-1]  # a head for another vocabulary
    save_file(tensors, tmp_path / "bad" / ADAPTER_WEIGHTS_NAME)
    model = PeftModel.from_pretrained(tiny_llama(), str(root / "adapters" / "task-0"))
    with pytest.raises(peft_jd.ShapeMismatchError, match="lm_head"):
        peft_jd.load_adapters(model, [str(tmp_path / "good"), str(tmp_path / "bad")], ["good", "bad"], progress=False)
    assert list(model.peft_config) == ["default"] and len(model.base_model.slot_table) == 1
    head = model.base_model.model.lm_head
    assert not hasattr(head, "modules_to_save") or not set(head.modules_to_save) & {"good", "bad"}
    peft_jd.load_adapters(model, [str(tmp_path / "good")], ["good"], progress=False)
    model.set_adapter("good")
    torch.testing.assert_close(logits(model, IDS), logits(lora_reference(data, adapter), IDS), atol=1e-5, rtol=1e-5)


def test_lora_export_carries_modules_to_save(coll, tmp_path):
    root, data = coll
    adapter = write_head_adapter(root, tmp_path / "head", seed=6)
    model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "head"))
    peft_jd.to_lora(model).save_pretrained(tmp_path / "from-model")
    peft_jd.export.export_adapter_to_lora(str(tmp_path / "head")).save_pretrained(tmp_path / "from-files")
    expected = logits(lora_reference(data, adapter), IDS)
    for folder in ("from-model", "from-files"):
        lora = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / folder))
        assert lora.peft_config["default"].peft_type == PeftType.LORA
        assert lora.peft_config["default"].modules_to_save == ["lm_head"]
        torch.testing.assert_close(logits(lora, IDS), expected, atol=1e-5, rtol=1e-5)


def test_peft_code_paths_reading_peft_type(coll, tmp_path):
    root, _ = coll
    config = peft_jd.JDLoraConfig(r=4, target_modules=TARGETS, bases=str(root / "bases"))
    assert isinstance(config.peft_type, PeftType) and config.peft_type.value == "JDLORA"
    model = PeftModel.from_pretrained(tiny_llama(), str(root / "adapters" / "task-0"))
    model.save_pretrained(tmp_path / "saved")
    assert "library_name: peft" in (tmp_path / "saved" / "README.md").read_text()  # PEFT's model-card step ran
    assert model.get_model_status().peft_types == {"default": "JDLORA"}
    # PEFT refuses what it does not support for JD-LoRA with its own ValueError, not an AttributeError on `.value`.
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        get_peft_model(tiny_llama(), copy.deepcopy(config), mixed=True)
    with pytest.raises(ValueError, match="only supports LORA but JDLORA"):
        hotswap_adapter(model, str(root / "adapters" / "task-1"), adapter_name="default")
