"""Bulk loading: same result as PEFT's `load_adapter`, chunked, all-or-nothing per chunk."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from utils import make_collection, tiny_llama

import peft_jd


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
    with pytest.raises(peft_jd.BasesMismatchError, match=r"foreign \(.*task-0\)"):
        peft_jd.load_adapters(model, sources, adapter_names=["good", "foreign"], progress=False)
    assert set(model.peft_config) == {"default"} and len(model.base_model.slot_table) == 1
    for layer in model.base_model.jd_layers().values():
        assert set(layer.jd_sigma) == {"default"}


def test_bulk_load_needs_a_jd_model():
    with pytest.raises(TypeError, match="PeftModel.from_pretrained"):
        peft_jd.load_adapters(tiny_llama(), ["x"])
