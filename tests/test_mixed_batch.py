"""Mixed batches through PEFT's `adapter_names=`: every row equals running it alone with its adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from transformers import GenerationConfig
from utils import dense_delta, make_collection, target_linears, tiny_llama

import peft_jd


NAMES = ["default", "task-1", "__base__", "task-2", "task-1", "task-3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    base = tiny_llama()
    data = make_collection(root, base, n_adapters=4, r=3, clusters=3)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(root / "adapters" / "task-0"))
    model.load_adapter(str(root / "adapters" / "task-1"), adapter_name="task-1")
    adapters = [str(root / "adapters" / n) for n in ("task-2", "task-3")]
    peft_jd.load_adapters(model, adapters, adapter_names=["task-2", "task-3"], progress=False)
    return base, data, model.eval()


def dense_model(base, data, adapter):
    """Reference: the base model with ΔW = U Σ Vᵀ added to its weights (no JD code involved)."""
    model = copy.deepcopy(base)
    if adapter is not None:
        with torch.no_grad():
            for key, lin in target_linears(model).items():
                lin.weight += dense_delta(data, adapter, key)
    return model


def row_adapter(name):
    return {"default": "task-0", "__base__": None}.get(name, name)


def test_mixed_forward_equals_rows_alone(setup):
    base, data, model = setup
    ids = torch.randint(0, 128, (len(NAMES), 8))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=NAMES).logits
        for i, name in enumerate(NAMES):
            alone = dense_model(base, data, row_adapter(name))(input_ids=ids[i : i + 1]).logits
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_mixed_forward_is_independent_of_active_adapter(setup):
    _, _, model = setup
    ids = torch.randint(0, 128, (len(NAMES), 5))
    with torch.no_grad():
        first = model(input_ids=ids, adapter_names=NAMES).logits
        model.set_adapter("task-2")
        second = model(input_ids=ids, adapter_names=NAMES).logits
        model.set_adapter("default")
    torch.testing.assert_close(first, second)


def test_mixed_generate_scores_equal_rows_alone(setup):
    base, data, model = setup
    ids = torch.randint(3, 128, (len(NAMES), 6))
    kwargs = dict(
        max_new_tokens=4,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        attention_mask=torch.ones_like(ids),
    )
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=NAMES, **kwargs)
        for i, name in enumerate(NAMES):
            ref = dense_model(base, data, row_adapter(name))
            alone = ref.generate(input_ids=ids[i : i + 1], **{**kwargs, "attention_mask": torch.ones_like(ids[:1])})
            assert torch.equal(mixed.sequences[i], alone.sequences[0])
            for step_mixed, step_alone in zip(mixed.scores, alone.scores):
                torch.testing.assert_close(step_mixed[i], step_alone[0], atol=1e-4, rtol=1e-4)


def test_mixed_beam_search_equals_rows_alone(setup):
    base, data, model = setup
    names = NAMES[:3]
    ids = torch.randint(3, 128, (len(names), 5))
    kwargs = dict(max_new_tokens=3, do_sample=False, num_beams=3, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kwargs)
        for i, name in enumerate(names):
            ref = dense_model(base, data, row_adapter(name))
            alone = ref.generate(input_ids=ids[i : i + 1], attention_mask=torch.ones_like(ids[:1]), **kwargs)
            assert torch.equal(mixed[i], alone[0])


@pytest.mark.parametrize(
    "names, batch",
    [
        (["default", "task-1"], 3),
        # Counts that divide the batch used to be repeated silently; PEFT's LoRA raises, and so do we.
        (["default"], 3),
        (["default", "task-1"], 4),
        (["default", "task-1", "task-2", "__base__"], 2),
    ],
)
def test_mixed_batch_needs_one_name_per_sequence(setup, names, batch):
    _, _, model = setup
    ids = torch.randint(0, 128, (batch, 4))
    with pytest.raises(ValueError, match="one name per sequence"), torch.no_grad():
        model(input_ids=ids, adapter_names=names)


def test_generate_num_return_sequences_expands_each_name(setup):
    base, data, model = setup
    names = ["task-1", "__base__", "default"]
    ids = torch.randint(3, 128, (len(names), 5))
    # top_k=1 sampling is greedy, so every returned sequence equals its row generated alone.
    kwargs = dict(max_new_tokens=3, do_sample=True, top_k=1, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, num_return_sequences=2, **kwargs
        )
        assert mixed.shape[0] == 2 * len(names)
        for i, name in enumerate(names):
            ref = dense_model(base, data, row_adapter(name))
            alone = ref.generate(input_ids=ids[i : i + 1], attention_mask=torch.ones_like(ids[:1]), **kwargs)
            assert torch.equal(mixed[2 * i], alone[0]) and torch.equal(mixed[2 * i + 1], alone[0])


def test_generate_reads_beams_from_a_generation_config(setup):
    base, data, model = setup
    names = ["task-2", "default"]
    ids = torch.randint(3, 128, (len(names), 5))
    config = GenerationConfig(max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, generation_config=config
        )
        for i, name in enumerate(names):
            ref = dense_model(base, data, row_adapter(name))
            alone = ref.generate(
                input_ids=ids[i : i + 1], attention_mask=torch.ones_like(ids[:1]), generation_config=config
            )
            assert torch.equal(mixed[i], alone[0])


def test_mixed_batch_refused_in_training_mode(setup):
    _, _, model = setup
    model.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            model(input_ids=torch.zeros(1, 3, dtype=torch.long), adapter_names=["default"])
    finally:
        model.eval()


def test_mixed_batch_with_different_scalings(tmp_path):
    import json

    base = tiny_llama()
    data = make_collection(tmp_path, base, n_adapters=2, r=3, clusters=1)
    config_path = tmp_path / "adapters" / "task-1" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["scaling"] = 0.5
    config_path.write_text(json.dumps(config))
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapters" / "task-0"))
    model.load_adapter(str(tmp_path / "adapters" / "task-1"), adapter_name="task-1")
    ids = torch.randint(0, 128, (2, 5))
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for key, lin in target_linears(reference).items():
            lin.weight += 0.5 * dense_delta(data, "task-1", key)
        mixed = model(input_ids=ids, adapter_names=["default", "task-1"]).logits
        torch.testing.assert_close(mixed[1:], reference(input_ids=ids[1:]).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mixed[:1], dense_model(base, data, "task-0")(input_ids=ids[:1]).logits)


def test_mixed_batch_refused_while_merged(setup):
    _, _, model = setup
    model.merge_adapter()
    try:
        with pytest.raises(ValueError, match="merged"), torch.no_grad():
            model(input_ids=torch.zeros(1, 3, dtype=torch.long), adapter_names=["default"])
    finally:
        model.unmerge_adapter()
