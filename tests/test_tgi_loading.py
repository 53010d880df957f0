"""Loading JD adapters the way TGI's `load_module_map` does (without TGI): detection, Σ, bases, errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from utils import make_collection, target_linears, tiny_llama

from peft_jd.core import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, AdapterFormatError, BasesNotFoundError
from tgi_patch import loading
from tgi_patch.adapter_files import HubOrigin, bases_reference, read_spec


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("collection")
    model = tiny_llama()
    collection = make_collection(root, model, n_adapters=2, r=4, clusters=2, sigma_type="diag")
    # TGI's weight names: every adapter-capable module of the model (here all linear layers of the blocks).
    names = tuple(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n)
    return root, collection, names


def test_detects_jd_adapters_and_leaves_others_to_tgi(built, tmp_path):
    root, _, _ = built
    assert loading.is_jd_adapter("task-0", str(root / "adapters" / "task-0"), None)
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert not loading.is_jd_adapter("lora", str(lora), None)
    assert not loading.is_jd_adapter("missing", str(tmp_path / "missing"), None)


def test_module_map_holds_sigma_per_module(built):
    root, collection, names = built
    module_map, config, weight_names, tokenizer = loading.load_jd_module_map(
        "task-1", str(root / "adapters" / "task-1"), None, names, model_id="/models/tiny-llama")
    assert tokenizer is None and config.adapter_id == "task-1"
    assert set(module_map) == set(collection["sigmas"]["task-1"]) == set(target_linears(tiny_llama()))
    for key, sigma in collection["sigmas"]["task-1"].items():
        tensor, name = module_map[key]["jd_sigma"]
        assert name == f"base_model.model.{key}.jd_sigma" and name in weight_names
        torch.testing.assert_close(tensor, sigma)
        torch.testing.assert_close(config.sigmas[key], sigma)
    assert config.bases.key.location == str(root / "bases")
    assert config.spec.cluster_of("model.layers.0.self_attn.q_proj") == 1


def test_bases_override_and_unservable_modules(built, tmp_path):
    root, _, names = built
    copy = tmp_path / "copy"
    shutil.copytree(root / "bases", copy)
    _, config, _, _ = loading.load_jd_module_map("task-0", str(root / "adapters" / "task-0"), None, names,
                                                 bases_override=str(copy))
    assert config.bases.key.location == str(copy)
    only_q = tuple(n for n in names if n.endswith("q_proj"))
    with pytest.raises(AdapterFormatError, match="task-0.*cannot adapt.*k_proj"):
        loading.load_jd_module_map("task-0", str(root / "adapters" / "task-0"), None, only_q)


def test_hub_adapter_downloads_files_and_resolves_relative_bases_in_its_repo(built, monkeypatch):
    root, _, names = built
    downloads = []

    def fake_hub_download(repo_id, filenames, *, subfolder=None, revision=None, **kwargs):
        downloads.append((repo_id, revision, tuple(filenames)))
        return [os.path.join(root, "adapters", "task-0", name) for name in filenames]

    monkeypatch.setattr(loading, "hub_download", fake_hub_download)
    directory, origin = loading.adapter_directory("org/task-0", None, "abc")
    assert directory == str(root / "adapters" / "task-0") and origin == HubOrigin("org/task-0", None, "abc")
    spec = read_spec("org/task-0", directory, HubOrigin("org/coll", "adapters/task-0", "abc"))
    assert bases_reference(spec) == ("org/coll", "abc", "bases")
    # The same files as the root of repo `org/task-0`: `../../bases` would leave the repo.
    with pytest.raises(BasesNotFoundError, match="outside its repo"):
        loading.load_jd_module_map("org/task-0", None, "abc", names)
    assert downloads == [("org/task-0", "abc", (ADAPTER_CONFIG_NAME,)),
                         ("org/task-0", "abc", (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME))]
    # With the launcher's bases directory, the adapter's own reference is not resolved.
    _, config, _, _ = loading.load_jd_module_map("org/task-0", None, "abc", names,
                                                 bases_override=str(root / "bases"))
    assert config.bases.key.location == str(root / "bases")


def test_modules_to_save_cannot_be_served(built, tmp_path):
    root, _, names = built
    adapter = tmp_path / "task-0"
    shutil.copytree(root / "adapters" / "task-0", adapter)
    config_path = adapter / ADAPTER_CONFIG_NAME
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "modules_to_save": ["score"]}))
    with pytest.raises(AdapterFormatError, match="'x'.*modules_to_save.*TGI cannot serve"):
        loading.load_jd_module_map("x", str(adapter), None, names, bases_override=str(root / "bases"))


def test_corrupt_sigma_is_rejected_with_its_file(built, tmp_path):
    root, _, names = built
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "task-0"
    shutil.copytree(root / "adapters" / "task-0", adapter)
    config_path = adapter / "adapter_config.json"
    config_json = json.loads(config_path.read_text())
    config_json["bases"] = str(root / "bases")
    config_path.write_text(json.dumps(config_json))
    loading.load_jd_module_map("x", str(adapter), None, names)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key][0] = float("nan")
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match="NaN or inf"):
        loading.load_jd_module_map("x", str(adapter), None, names)
