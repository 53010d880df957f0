"""JD-LoRA tuner: forward vs an independently built PEFT LoRA, merging, save/load, shared bases, training."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.peft_types import PeftType
from utils import TARGETS, dense_delta, make_collection, target_linears, tiny_llama, tiny_mistral

import peft_jd
from peft_jd.core import ADAPTER_WEIGHTS_NAME, load_shared_bases


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("coll")
    data = make_collection(root, tiny_llama(), n_adapters=4, r=4, clusters=2)
    return root, data


def plain_lora_model(base, data, adapter: str):
    """The same update as a standard PEFT LoRA: B' = U Σ, A' = Vᵀ, built from the raw tensors, not our export."""
    r = next(iter(data["sigmas"][adapter].values())).shape[0]
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, init_lora_weights=False))
    c = data["clusters"][adapter]
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = name.removeprefix("base_model.model.")
            U, V = data["bases"][key]
            sigma = data["sigmas"][adapter][key]
            sigma = sigma if sigma.dim() == 2 else torch.diag(sigma)
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(V[c].T)
                module.lora_B["default"].weight.copy_(U[c] @ sigma)
    return model.eval()


def test_registration_is_idempotent():
    assert PeftType.JDLORA == "JDLORA"
    importlib.reload(importlib.import_module("peft_jd.tuner.peft_type"))
    importlib.import_module("peft_jd.tuner")._register()
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.JDLORA] is peft_jd.JDLoraModel


def test_unsupported_peft_version_is_refused():
    with pytest.raises(ImportError, match="peft-jd supports peft"):
        importlib.import_module("peft_jd.tuner.peft_type").check_peft_version("0.17.0")


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_mistral])
@pytest.mark.parametrize("sigma_type", ["full", "diag"])
def test_forward_equals_plain_peft_lora(tmp_path, make_model, sigma_type):
    base = make_model()
    name = base.config._name_or_path
    data = make_collection(tmp_path, base, n_adapters=2, r=5, clusters=2, sigma_type=sigma_type, base_model=name)
    ids = torch.randint(0, 128, (3, 9))
    reference = plain_lora_model(copy.deepcopy(base), data, "task-1")
    jd = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapters" / "task-1"))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = jd(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_merge_unmerge_and_disable(collection):
    root, data = collection
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, str(root / "adapters" / "task-0"))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
        restored = model(input_ids=ids).logits
        with model.disable_adapter():
            disabled = model(input_ids=ids).logits
    assert (unmerged - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(restored, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(disabled, base_logits, atol=1e-6, rtol=1e-6)
    plain = model.merge_and_unload()
    assert not any("jd_" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_merged_weight_equals_dense_delta(collection):
    root, data = collection
    base = tiny_llama()
    original = {k: m.weight.detach().clone() for k, m in target_linears(base).items()}
    model = PeftModel.from_pretrained(base, str(root / "adapters" / "task-3")).merge_and_unload()
    for key, lin in target_linears(model).items():
        torch.testing.assert_close(lin.weight, original[key] + dense_delta(data, "task-3", key), atol=1e-6, rtol=0)


def test_set_adapter_and_delete_adapter_reuse_slots(collection):
    root, _ = collection
    ids = torch.randint(0, 128, (1, 5))
    model = PeftModel.from_pretrained(tiny_llama(), str(root / "adapters" / "task-0"))
    model.load_adapter(str(root / "adapters" / "task-1"), adapter_name="t1")
    with torch.no_grad():
        out0 = model(input_ids=ids).logits
        model.set_adapter("t1")
        out1 = model(input_ids=ids).logits
    assert (out0 - out1).abs().max() > 1e-3
    tuner = model.base_model
    slot = tuner.slot_table.slot_of["t1"]
    model.delete_adapter("t1")
    assert "t1" not in tuner.slot_table and "t1" not in model.peft_config
    for layer in tuner.jd_layers().values():
        assert "t1" not in layer.jd_sigma and torch.count_nonzero(layer.jd_sigma_stack[slot]) == 0
    model.load_adapter(str(root / "adapters" / "task-2"), adapter_name="t2")
    assert tuner.slot_table.slot_of["t2"] == slot


def test_adapters_share_one_bases_copy_and_checkpoint_holds_only_sigma(collection, tmp_path):
    root, data = collection
    model = PeftModel.from_pretrained(tiny_llama(), str(root / "adapters" / "task-0"))
    model.load_adapter(str(root / "adapters" / "task-1"), adapter_name="t1")
    peft_jd.load_adapters(model, [str(root / "adapters" / "task-2")], adapter_names=["t2"], progress=False)
    shared = load_shared_bases(str(root / "bases"))
    assert model.base_model.shared_bases is shared
    for key, layer in model.base_model.jd_layers().items():
        assert layer.jd_U is shared.tensors[key][0]
        assert layer.jd_U.data_ptr() == shared.tensors[key][0].data_ptr()
        assert {"default", "t1", "t2"} <= set(layer.jd_sigma)
    model.save_pretrained(str(tmp_path / "saved"), selected_adapters=["t1"])
    saved = tmp_path / "saved" / "t1" / ADAPTER_WEIGHTS_NAME
    sigma_bytes = sum(s.numel() * 4 for s in data["sigmas"]["task-1"].values())
    assert saved.stat().st_size < sigma_bytes + 4096
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "saved" / "t1"))
    ids = torch.randint(0, 128, (2, 5))
    model.set_adapter("t1")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_device_dtype_move_keeps_sigma_views(collection):
    root, _ = collection
    model = PeftModel.from_pretrained(tiny_llama(), str(root / "adapters" / "task-0"))
    model.to(torch.float64)
    for layer in model.base_model.jd_layers().values():
        slot = layer.slot_table.slot_of["default"]
        assert layer.jd_sigma["default"].data_ptr() == layer.jd_sigma_stack[slot].data_ptr()
        assert layer.jd_sigma_stack.dtype == torch.float64


def test_sigma_is_trainable_from_fresh_config(collection):
    root, data = collection
    config = peft_jd.JDLoraConfig(
        r=4, target_modules=TARGETS, bases=str(root / "bases"), cluster=1, base_model_name_or_path="tiny-llama"
    )
    model = get_peft_model(tiny_llama(), config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".jd_sigma." in n for n in trainable)
    ids = torch.randint(0, 128, (2, 6))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    layer = next(iter(model.base_model.jd_layers().values()))
    slot = layer.slot_table.slot_of["default"]
    assert torch.count_nonzero(layer.jd_sigma_stack[slot]) > 0  # the stack sees the optimiser's update


def test_to_lora_export_is_exact(collection, tmp_path):
    root, _ = collection
    ids = torch.randint(0, 128, (2, 7))
    model = PeftModel.from_pretrained(tiny_llama(), str(root / "adapters" / "task-1"), adapter_name="task-1")
    export = peft_jd.to_lora(model, "task-1")
    export.save_pretrained(tmp_path / "lora")
    lora = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lora"))
    assert lora.peft_config["default"].peft_type == PeftType.LORA
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    from_files = peft_jd.export.export_adapter_to_lora(str(root / "adapters" / "task-1"))
    for key, value in export.state_dict.items():
        torch.testing.assert_close(from_files.state_dict[key], value)


def test_bf16_base_uses_bf16_bases_and_fp32_sigma(collection):
    root, data = collection
    base = tiny_llama().to(torch.bfloat16)
    model = PeftModel.from_pretrained(base, str(root / "adapters" / "task-2"))
    layer = next(iter(model.base_model.jd_layers().values()))
    assert layer.jd_U.dtype == torch.bfloat16 and layer.jd_sigma_stack.dtype == torch.float32
    shared = model.base_model.shared_bases
    key = next(iter(model.base_model.jd_layers()))
    assert shared.module(key, torch.bfloat16)[0] is layer.jd_U  # one bf16 copy per process, shared
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        got = layer(x).float()
        expected = layer.get_base_layer()(x).float() + x.float() @ dense_delta(data, "task-2", key).T
        mixed = model.base_model.slot_table
        mixed.set_rows(torch.tensor([mixed.slot_of["default"]] * 3))
        try:
            got_mixed = layer(x).float()
        finally:
            mixed.set_rows(None)
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got_mixed, got, atol=2e-2, rtol=2e-2)


def test_kernel_backend_is_resolved_when_placed_not_per_call(collection, monkeypatch):
    root, _ = collection
    model = PeftModel.from_pretrained(tiny_llama(), str(root / "adapters" / "task-0"))
    layers = list(model.base_model.jd_layers().values())
    assert {layer.kernel_backend for layer in layers} == {"torch"}  # CPU tensors
    layer_module = importlib.import_module("peft_jd.tuner.layer")
    resolved, kernel_backends = [], []
    real_apply = layer_module.jd_lora_apply
    monkeypatch.setattr(
        layer_module, "select_backend", lambda device, backend=None: resolved.append(device) or "torch"
    )
    monkeypatch.setattr(
        layer_module,
        "jd_lora_apply",
        lambda *a, backend=None, **k: kernel_backends.append(backend) or real_apply(*a, backend=backend, **k),
    )
    # The environment was read on every layer call before; a bad value now changes nothing until the next placement.
    monkeypatch.setenv("PEFT_JD_KERNEL", "no-such-backend")
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (2, 4)), adapter_names=["default", "__base__"])
    assert not resolved and set(kernel_backends) == {"torch"} and len(kernel_backends) == len(layers)
    model.float()  # a device/dtype move resolves it again, once per layer
    assert len(resolved) == len(layers)
