"""Every documented error case raises the documented exception, naming the adapter/module and the fix."""

from __future__ import annotations

import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from utils import edit_adapter_config, make_collection, tiny_llama

import peft_jd
from peft_jd.core import ADAPTER_WEIGHTS_NAME, BASES_WEIGHTS_NAME


@pytest.fixture()
def coll(tmp_path):
    make_collection(tmp_path / "a", tiny_llama(), n_adapters=2, r=4, clusters=2)
    return tmp_path


def test_missing_bases(coll):
    shutil.rmtree(coll / "a" / "bases")
    with pytest.raises(peft_jd.BasesNotFoundError, match="bases"):
        PeftModel.from_pretrained(tiny_llama(), str(coll / "a" / "adapters" / "task-0"))


def test_incomplete_bases_directory(coll):
    (coll / "a" / "bases" / BASES_WEIGHTS_NAME).unlink()
    with pytest.raises(peft_jd.BasesNotFoundError, match="not written completely"):
        PeftModel.from_pretrained(tiny_llama(), str(coll / "a" / "adapters" / "task-0"))


def test_sigma_shape_mismatch_names_adapter_and_module(coll):
    adapter = coll / "a" / "adapters" / "task-1"
    tensors = load_file(adapter / ADAPTER_WEIGHTS_NAME)
    key = sorted(tensors)[0]
    tensors[key] = torch.zeros(5, 5)
    save_file(tensors, adapter / ADAPTER_WEIGHTS_NAME)
    model = PeftModel.from_pretrained(tiny_llama(), str(coll / "a" / "adapters" / "task-0"))
    module = key.removeprefix("base_model.model.").removesuffix(".jd_sigma")
    with pytest.raises(peft_jd.ShapeMismatchError, match=rf"'bad'.*{module}"):
        peft_jd.load_adapters(model, [str(adapter)], adapter_names=["bad"], progress=False)
    assert "bad" not in model.peft_config and "bad" not in model.base_model.slot_table


def test_nan_sigma_is_rejected(coll):
    adapter = coll / "a" / "adapters" / "task-1"
    tensors = load_file(adapter / ADAPTER_WEIGHTS_NAME)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, adapter / ADAPTER_WEIGHTS_NAME)
    model = PeftModel.from_pretrained(tiny_llama(), str(coll / "a" / "adapters" / "task-0"))
    with pytest.raises(peft_jd.AdapterFormatError, match="NaN"):
        peft_jd.load_adapters(model, [str(adapter)], progress=False)


def test_bases_for_another_base_model_shape(coll):
    other = tiny_llama(hidden_size=32, intermediate_size=64)
    with pytest.raises(peft_jd.ShapeMismatchError, match="another base model"):
        PeftModel.from_pretrained(other, str(coll / "a" / "adapters" / "task-0"))


def test_base_model_name_mismatch(tmp_path):
    make_collection(tmp_path, tiny_llama(), n_adapters=1, r=4, base_model="org/tiny-llama")
    adapter = str(tmp_path / "adapters" / "task-0")
    with pytest.raises(peft_jd.BaseModelMismatchError, match="org/tiny-llama"):
        PeftModel.from_pretrained(tiny_llama(name="org/other-model"), adapter)
    # A local path or file name is no identity: same shapes only warn.
    with pytest.warns(UserWarning, match="org/tiny-llama"):
        PeftModel.from_pretrained(tiny_llama(name="/models/tiny-llama"), adapter)


def test_unknown_adapter_in_adapter_names(coll):
    model = PeftModel.from_pretrained(tiny_llama(), str(coll / "a" / "adapters" / "task-0"))
    with pytest.raises(peft_jd.UnknownAdapterError, match="typo.*Loaded adapters: default"), torch.no_grad():
        model(input_ids=torch.zeros(2, 3, dtype=torch.long), adapter_names=["default", "typo"])


def test_sigma_type_mismatch(coll):
    make_collection(coll / "d", tiny_llama(), n_adapters=1, r=4, sigma_type="diag")
    model = PeftModel.from_pretrained(tiny_llama(), str(coll / "a" / "adapters" / "task-0"))
    with pytest.raises(peft_jd.JDLoraError, match="sigma_type"):
        model.load_adapter(str(coll / "d" / "adapters" / "task-0"), adapter_name="diag")


def test_other_bases_collection_is_refused(coll):
    make_collection(coll / "b", tiny_llama(), n_adapters=1, r=4, clusters=2, seed=7)
    model = PeftModel.from_pretrained(tiny_llama(), str(coll / "a" / "adapters" / "task-0"))
    with pytest.raises(peft_jd.BasesMismatchError, match="already serves bases"):
        model.load_adapter(str(coll / "b" / "adapters" / "task-0"), adapter_name="other")
    with pytest.raises(peft_jd.BasesMismatchError, match="already serves bases"):
        peft_jd.load_adapters(model, [str(coll / "b" / "adapters" / "task-0")], progress=False)


def test_fingerprint_mismatch_after_recompression(coll):
    adapter = coll / "a" / "adapters" / "task-0"
    edit_adapter_config(adapter, bases_fingerprint="0" * 64)
    with pytest.raises(peft_jd.BasesMismatchError, match="fingerprint"):
        PeftModel.from_pretrained(tiny_llama(), str(adapter))


def test_cluster_out_of_range(coll):
    adapter = coll / "a" / "adapters" / "task-0"
    edit_adapter_config(adapter, cluster=5)
    model = PeftModel.from_pretrained(tiny_llama(), str(coll / "a" / "adapters" / "task-1"))
    with pytest.raises(peft_jd.BasesMismatchError, match="cluster 5"):
        model.load_adapter(str(adapter), adapter_name="bad")
    assert all("bad" not in layer.jd_sigma for layer in model.base_model.jd_layers().values())


def test_rank_mismatch(coll):
    adapter = coll / "a" / "adapters" / "task-0"
    edit_adapter_config(adapter, r=8)
    with pytest.raises(peft_jd.JDLoraError, match="r=8"):
        PeftModel.from_pretrained(tiny_llama(), str(adapter))


def test_duplicate_names_in_bulk_load(coll):
    model = PeftModel.from_pretrained(tiny_llama(), str(coll / "a" / "adapters" / "task-0"))
    with pytest.raises(ValueError, match="already loaded or repeated"):
        peft_jd.load_adapters(model, [str(coll / "a" / "adapters" / "task-1")], adapter_names=["default"])


@pytest.mark.parametrize(
    "name, message",
    [("double", "clashes with the torch module attribute"), ("v1.2", "contains a dot"), ("__base__", "reserved")],
)
def test_unusable_adapter_names_fail_before_touching_the_model(coll, name, message):
    task_1 = str(coll / "a" / "adapters" / "task-1")
    model = PeftModel.from_pretrained(tiny_llama(), str(coll / "a" / "adapters" / "task-0"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peft_jd.AdapterNameError, match=message):
        model.load_adapter(task_1, adapter_name=name)
    with pytest.raises(peft_jd.AdapterNameError, match=message):
        peft_jd.load_adapters(model, [task_1], adapter_names=[name])
    assert list(model.peft_config) == ["default"]
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    # The same adapter under a usable name still loads.
    model.load_adapter(task_1, adapter_name=f"{name.replace('.', '_')}_ok")
    with pytest.raises(peft_jd.AdapterNameError, match=message):
        PeftModel.from_pretrained(tiny_llama(), task_1, adapter_name=name)


def poison_sigma(adapter_dir, value=float("nan"), shape=None, dtype=None):
    """Rewrites the adapter's first Σ with a NaN (or another shape / dtype)."""
    tensors = load_file(adapter_dir / ADAPTER_WEIGHTS_NAME)
    key = sorted(tensors)[0]
    if shape is not None:
        tensors[key] = torch.zeros(shape)
    elif dtype is not None:
        tensors[key] = tensors[key].to(dtype)
    else:
        tensors[key][0] = value
    save_file(tensors, adapter_dir / ADAPTER_WEIGHTS_NAME)
    return key.removeprefix("base_model.model.").removesuffix(".jd_sigma")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_sigma_is_refused_by_from_pretrained(coll, value):
    adapter = coll / "a" / "adapters" / "task-1"
    module = poison_sigma(adapter, value)
    with pytest.raises(peft_jd.AdapterFormatError, match=rf"'default' for module {module}.*NaN or inf"):
        PeftModel.from_pretrained(tiny_llama(), str(adapter))


@pytest.mark.parametrize(
    "poison, error, message",
    [
        (dict(value=float("nan")), peft_jd.AdapterFormatError, "NaN or inf"),
        (dict(shape=(5, 5)), peft_jd.ShapeMismatchError, r"shape \(5, 5\), expected \(4, 4\)"),
        (dict(dtype=torch.int32), peft_jd.AdapterFormatError, "not float"),
    ],
)
def test_bad_sigma_via_load_adapter_leaves_the_model_as_it_was(coll, poison, error, message):
    adapter = coll / "a" / "adapters" / "task-1"
    poison_sigma(adapter, **poison)
    model = PeftModel.from_pretrained(tiny_llama(), str(coll / "a" / "adapters" / "task-0"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 128, (2, 4))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    with pytest.raises(error, match=message):
        model.load_adapter(str(adapter), adapter_name="bad")
    assert list(model.peft_config) == ["default"] and "bad" not in model.base_model.slot_table
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits)


def test_sigma_for_a_module_the_model_does_not_adapt(coll):
    adapter = coll / "a" / "adapters" / "task-1"
    tensors = load_file(adapter / ADAPTER_WEIGHTS_NAME)
    tensors["base_model.model.model.layers.0.mlp.up_proj.jd_sigma"] = torch.zeros(4, 4)
    save_file(tensors, adapter / ADAPTER_WEIGHTS_NAME)
    with pytest.raises(peft_jd.BasesNotFoundError, match="up_proj"):
        PeftModel.from_pretrained(tiny_llama(), str(adapter))


def test_injection_validates_every_target_before_touching_the_model(coll):
    base = tiny_llama()
    config = peft_jd.JDLoraConfig(
        r=4, target_modules=["q_proj", "o_proj"], bases=str(coll / "a" / "bases"), base_model_name_or_path="tiny-llama"
    )
    with pytest.raises(peft_jd.BasesNotFoundError, match="o_proj"):
        get_peft_model(base, config)
    assert not any(isinstance(module, peft_jd.JDLoraLayer) for module in base.modules())
