"""Bulk loading: same result as PEFT's `load_adapter`, chunked, all-or-nothing per chunk."""

from __future__ import annotations

import copy

import pytest
import torch
from huggingface_hub import HfApi
from peft import PeftModel
from utils import make_collection, tiny_llama

import peft_jd
from peft_jd.bulk import read_sigma_adapter
from peft_jd.export import export_adapter_to_lora


pytest_plugins = ["hub_server.fixtures"]


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    root = tmp_path_factory.mktemp("bulk")
    make_collection(root, tiny_llama(), n_adapters=7, r=4, clusters=3)
    return root


def test_bulk_equals_load_adapter_across_chunks(coll):
    base = tiny_llama()
    names = [f"task-{i}" for i in range(1, 7)]
    one_by_one = PeftModel.from_pretrained(copy.deepcopy(base), str(coll / "adapters" / "task-0"))
    for name in names:
        one_by_one.load_adapter(str(coll / "adapters" / name), adapter_name=name)
    bulk = PeftModel.from_pretrained(copy.deepcopy(base), str(coll / "adapters" / "task-0"))
    loaded = peft_jd.load_adapters(bulk, [str(coll / "adapters" / n) for n in names], chunk_size=4, progress=False)
    assert loaded == names and set(bulk.peft_config) == {"default", *names}
    batch = ["default", *names, "__base__"]
    ids = torch.randint(0, 128, (len(batch), 5))
    with torch.no_grad():
        expected = one_by_one(input_ids=ids, adapter_names=batch).logits
        got = bulk(input_ids=ids, adapter_names=batch).logits
    torch.testing.assert_close(got, expected)
    for layer in bulk.base_model.jd_layers().values():
        for name in names:
            assert not layer.jd_sigma[name].requires_grad
            slot = layer.slot_table.slot_of[name]
            assert layer.jd_sigma[name].data_ptr() == layer.jd_sigma_stack[slot].data_ptr()


def test_bulk_load_is_all_or_nothing_per_chunk(coll, tmp_path):
    make_collection(tmp_path, tiny_llama(), n_adapters=1, r=4, clusters=3, seed=5)  # other bases
    model = PeftModel.from_pretrained(tiny_llama(), str(coll / "adapters" / "task-0"))
    sources = [str(coll / "adapters" / "task-1"), str(tmp_path / "adapters" / "task-0")]
    with pytest.raises(peft_jd.BasesMismatchError, match=r"'foreign' \(.*task-0"):
        peft_jd.load_adapters(model, sources, adapter_names=["good", "foreign"], progress=False)
    assert set(model.peft_config) == {"default"} and len(model.base_model.slot_table) == 1
    for layer in model.base_model.jd_layers().values():
        assert set(layer.jd_sigma) == {"default"}


def test_bulk_load_needs_a_jd_model():
    with pytest.raises(TypeError, match="PeftModel.from_pretrained"):
        peft_jd.load_adapters(tiny_llama(), ["x"])


def test_load_sigma_adapters_takes_already_read_adapters(coll, tmp_path):
    model = PeftModel.from_pretrained(tiny_llama(), str(coll / "adapters" / "task-0"))
    reference = PeftModel.from_pretrained(tiny_llama(), str(coll / "adapters" / "task-0"))
    reference.load_adapter(str(coll / "adapters" / "task-1"), adapter_name="one")
    adapters = [read_sigma_adapter(str(coll / "adapters" / "task-1"), name="one")]
    assert model.base_model.load_sigma_adapters(adapters) == ["one"]
    ids = torch.randint(0, 128, (3, 4))
    names = ["one", "default", "__base__"]
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, adapter_names=names).logits, reference(input_ids=ids, adapter_names=names).logits
        )
    # A bulk-loaded adapter is a PEFT adapter like any other: saved and loaded back alone.
    model.save_pretrained(tmp_path, selected_adapters=["one"])
    alone = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "one"))
    model.set_adapter("one")
    with torch.no_grad():
        torch.testing.assert_close(alone(input_ids=ids).logits, model(input_ids=ids).logits)
    # One broken adapter in a call: none of that call's adapters is loaded.
    broken = read_sigma_adapter(str(coll / "adapters" / "task-3"), name="broken")
    next(iter(broken.sigmas.values()))[0, 0] = float("inf")
    good = read_sigma_adapter(str(coll / "adapters" / "task-2"), name="good")
    with pytest.raises(peft_jd.AdapterFormatError, match="'broken'.*NaN or inf"):
        model.base_model.load_sigma_adapters([good, broken])
    assert set(model.peft_config) == {"default", "one"} and "good" not in model.base_model.slot_table


def test_bulk_load_and_export_from_a_hub_collection_repo(coll, hub):
    api = HfApi()
    api.create_repo("org/coll")
    api.upload_folder(repo_id="org/coll", folder_path=str(coll))
    model = PeftModel.from_pretrained(tiny_llama(), "org/coll", subfolder="adapters/task-0")
    names = peft_jd.load_adapters(
        model, ["org/coll"] * 2, subfolders=["adapters/task-1", "adapters/task-2"], progress=False
    )
    assert names == ["task-1", "task-2"]
    local = PeftModel.from_pretrained(tiny_llama(), str(coll / "adapters" / "task-0"))
    peft_jd.load_adapters(local, [str(coll / "adapters" / n) for n in names], progress=False)
    batch = ["task-2", "default", "task-1"]
    ids = torch.randint(0, 128, (3, 4))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, adapter_names=batch).logits, local(input_ids=ids, adapter_names=batch).logits
        )
    from_hub = export_adapter_to_lora("org/coll", subfolder="adapters/task-1")
    from_disk = export_adapter_to_lora(str(coll / "adapters" / "task-1"))
    assert from_hub.state_dict.keys() == from_disk.state_dict.keys()
    for key, value in from_disk.state_dict.items():
        torch.testing.assert_close(from_hub.state_dict[key], value)
