"""`jd-text-generation-launcher`: argument parsing, adapter validation, shard environment, exec of TGI's launcher."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil

import huggingface_hub
import pytest
from safetensors.torch import load_file, save_file
from utils import edit_adapter_config, make_collection, tiny_llama

from peft_jd.core import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    BASES_CONFIG_NAME,
    BASES_WEIGHTS_NAME,
    AdapterFormatError,
    AdapterNameError,
    BasesMismatchError,
    BasesNotFoundError,
    ShapeMismatchError,
    SigmaTypeMismatchError,
)
from tgi_patch import launcher, resolve
from tgi_patch.resolve import AdapterEntry, LaunchError, parse_adapter_entries


@pytest.fixture(scope="module")
def collection_source(tmp_path_factory):
    """The module's collection; tests that edit adapter files take `collection`, a private copy (conftest.py)."""
    root = tmp_path_factory.mktemp("collection")
    make_collection(root, tiny_llama(), n_adapters=3, r=4, clusters=2)
    return root


def _poison_sigma(adapter_dir, value=float("nan")):
    path = adapter_dir / ADAPTER_WEIGHTS_NAME
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key].view(-1)[0] = value
    save_file(tensors, path)


def _plain_lora(path):
    path.mkdir(parents=True)
    (path / ADAPTER_CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    return path


def test_parse_adapter_entries(tmp_path):
    local = tmp_path / "adapter"
    local.mkdir()
    entries = parse_adapter_entries(f"a={local}, owner/repo@abc , hf:x=hf:org/coll/adapters/t1@v2,{local}")
    assert entries[0] == AdapterEntry(name="a", path=str(local))
    assert entries[1] == AdapterEntry(name="owner/repo", repo_id="owner/repo", revision="abc")
    assert entries[2] == AdapterEntry(name="hf:x", repo_id="org/coll", subfolder="adapters/t1", revision="v2")
    assert entries[3] == AdapterEntry(name=str(local), path=str(local))
    with pytest.raises(LaunchError, match="hf:owner/repo"):
        parse_adapter_entries("t=hf:justonepart")


def test_plan_adds_jd_adapters_to_lora_adapters_and_sets_shard_env(collection, tmp_path):
    lora = _plain_lora(tmp_path / "lora")
    argv = ["--model-id", "tiny-llama", "--lora-adapters", f"plain={lora}", "--port", "8080",
            "--jd-lora-adapters", f"t0={collection}/adapters/task-0,t2={collection}/adapters/task-2"]
    plan = launcher.plan_launch(argv, environ={"PYTHONPATH": "/somewhere"})
    assert plan.argv[:5] == ["text-generation-launcher", "--model-id", "tiny-llama", "--port", "8080"]
    lora_value = plan.argv[plan.argv.index("--lora-adapters") + 1].split(",")
    assert lora_value == [f"plain={lora}", f"t0={collection}/adapters/task-0", f"t2={collection}/adapters/task-2"]
    assert plan.argv[-2:] == ["--cuda-graphs", "0"]
    assert plan.env == {
        "PEFT_JD_TGI": "1",
        "PEFT_JD_TGI_ADAPTERS": "t0,t2",
        "PEFT_JD_TGI_BASES": str(collection / "bases"),
        "PEFT_JD_TGI_UNKNOWN_ADAPTER": "error",
        "PYTHONPATH": launcher.BOOT_DIR + os.pathsep + "/somewhere",
    }
    assert os.path.isfile(os.path.join(launcher.BOOT_DIR, "sitecustomize.py"))


def test_plan_collection_env_lists_and_explicit_cuda_graphs(collection):
    environ = {"LORA_ADAPTERS": "org/plain-lora", "JD_LORA_ADAPTERS": ""}
    argv = ["--jd-lora-collection", str(collection), "--cuda-graphs=1,2", "--jd-unknown-adapter", "warn",
            "--jd-launcher", "/opt/tgi/launcher"]
    plan = launcher.plan_launch(argv, environ=environ)
    assert plan.argv[0] == "/opt/tgi/launcher" and "--cuda-graphs=1,2" in plan.argv
    assert plan.argv.count("--cuda-graphs") == 0
    entries = plan.argv[plan.argv.index("--lora-adapters") + 1].split(",")
    assert entries[0] == "org/plain-lora" and [e.split("=")[0] for e in entries[1:]] == ["task-0", "task-1", "task-2"]
    assert plan.env["PEFT_JD_TGI_UNKNOWN_ADAPTER"] == "warn"
    assert any("CUDA-graph decode" in note for note in plan.notes)

    plan = launcher.plan_launch([], environ={"JD_LORA_ADAPTERS": f"t1={collection}/adapters/task-1"})
    assert plan.env["PEFT_JD_TGI_ADAPTERS"] == "t1"


def test_plan_without_jd_adapters_leaves_tgi_unchanged():
    plan = launcher.plan_launch(["--model-id", "m", "--lora-adapters", "a/b"], environ={})
    assert plan.argv == ["text-generation-launcher", "--model-id", "m", "--lora-adapters", "a/b"]
    assert plan.env == {}


@pytest.mark.parametrize(
    "edit,error,match",
    [
        (lambda c: edit_adapter_config(c / "adapters/task-1", bases_fingerprint="0" * 64), BasesMismatchError,
         "task-1.*fingerprint 000000000000"),
        (lambda c: edit_adapter_config(c / "adapters/task-1", r=8), ShapeMismatchError, "task-1.*r=8.*rank 4"),
        (lambda c: edit_adapter_config(c / "adapters/task-1", sigma_type="diag"), SigmaTypeMismatchError,
         "task-1.*sigma_type='diag'"),
        (lambda c: edit_adapter_config(c / "adapters/task-1", cluster=5), BasesMismatchError, "cluster 5.*2 cluster"),
        (lambda c: _poison_sigma(c / "adapters/task-1"), AdapterFormatError, "task-1.*NaN or inf"),
        (lambda c: _poison_sigma(c / "adapters/task-1", float("inf")), AdapterFormatError, "task-1.*NaN or inf"),
        (lambda c: edit_adapter_config(c / "adapters/task-1", modules_to_save=["lm_head"]), AdapterFormatError,
         "task-1.*modules_to_save"),
        (lambda c: edit_adapter_config(c / "adapters/task-1", bases="../../nowhere"), LaunchError,
         "nowhere.*does not exist"),
        (lambda c: (c / "bases/jd_bases.safetensors").unlink(), LaunchError, "jd_bases.safetensors does not exist"),
        (lambda c: edit_adapter_config(c / "adapters/task-1", peft_type="LORA"), AdapterFormatError,
         "peft_type='LORA'.*Pass plain LoRA adapters with --lora-adapters"),
    ],
)
def test_invalid_adapters_fail_at_launch(collection, edit, error, match):
    edit(collection)
    with pytest.raises(error, match=match):
        launcher.plan_launch(["--jd-lora-adapters", f"task-1={collection}/adapters/task-1"], environ={})


def test_sigma_for_module_outside_bases_fails(collection):
    config_path = collection / "bases" / "jd_bases_config.json"
    config = json.loads(config_path.read_text())
    config["modules"].pop("model.layers.1.self_attn.v_proj")
    config_path.write_text(json.dumps(config))
    with pytest.raises(BasesNotFoundError, match="model.layers.1.self_attn.v_proj"):
        launcher.plan_launch(["--jd-lora-adapters", f"t={collection}/adapters/task-0"], environ={})


def test_names_and_collections_must_be_consistent(collection, tmp_path):
    adapters = collection / "adapters"
    with pytest.raises(LaunchError, match=r"\['t'\].*more than once"):
        launcher.plan_launch(["--jd-lora-adapters", f"t={adapters}/task-0,t={adapters}/task-1"], environ={})
    with pytest.raises(LaunchError, match=r"\['t'\].*more than once"):
        launcher.plan_launch(["--lora-adapters", "t=/x", "--jd-lora-adapters", f"t={adapters}/task-0"], environ={})
    with pytest.raises(LaunchError, match="does not exist"):
        launcher.plan_launch(["--jd-lora-adapters", f"t={tmp_path}/missing"], environ={})
    other = tmp_path / "other"
    make_collection(other, tiny_llama(), n_adapters=1, r=4, seed=3)
    with pytest.raises(LaunchError, match="2 different bases collections"):
        launcher.plan_launch(["--jd-lora-adapters", f"a={adapters}/task-0,b={other}/adapters/task-0"], environ={})
    with pytest.raises(ValueError, match="not 'JDLORA'"):
        launcher.plan_launch(["--jd-lora-adapters", f"p={_plain_lora(tmp_path / 'lora')}"], environ={})


class FakeHub:
    """Serves `org/coll` from a local collection as the Hub cache would: each requested file is copied into a
    snapshot folder mirroring the repo, so only what was downloaded exists there."""

    def __init__(self, collection, cache):
        self.collection, self.cache, self.calls = collection, cache, []

    def _fetch(self, path):
        target = self.cache / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.collection / path, target)
        return str(target)

    def hub_download(self, repo_id, filenames, *, subfolder=None, revision=None, **kwargs):
        self.calls.append((repo_id, subfolder, revision, tuple(filenames)))
        assert repo_id == "org/coll" and revision == "v3"
        return [self._fetch(f"{subfolder}/{name}" if subfolder else name) for name in filenames]

    def snapshot_download(self, repo_id, revision=None, allow_patterns=()):
        self.calls.append((repo_id, "snapshot", revision, tuple(allow_patterns)))
        for path in sorted(self.collection.rglob("*")):
            relative = path.relative_to(self.collection).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(relative, p) for p in allow_patterns):
                self._fetch(relative)
        return str(self.cache)


def test_hub_entries_and_their_relative_bases_are_downloaded_through_the_core(collection, tmp_path, monkeypatch):
    hub = FakeHub(collection, tmp_path / "cache")
    monkeypatch.setattr(resolve, "hub_download", hub.hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    plan = launcher.plan_launch(["--jd-lora-adapters", "t1=hf:org/coll/adapters/task-1@v3"], environ={})
    # `bases: ../../bases` of a Hub adapter names the repo's bases folder, at the adapter's revision.
    assert hub.calls == [("org/coll", "adapters/task-1", "v3", (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)),
                         ("org/coll", "bases", "v3", (BASES_CONFIG_NAME, BASES_WEIGHTS_NAME))]
    assert f"t1={hub.cache}/adapters/task-1" in plan.argv[plan.argv.index("--lora-adapters") + 1]
    assert plan.env["PEFT_JD_TGI_BASES"] == str(hub.cache / "bases")

    hub.calls.clear()
    plan = launcher.plan_launch(["--jd-lora-collection", "org/coll@v3"], environ={})
    assert hub.calls[0] == ("org/coll", "snapshot", "v3", (f"adapters/*/{ADAPTER_CONFIG_NAME}",))
    assert {call[1] for call in hub.calls[1:]} == {"adapters/task-0", "adapters/task-1", "adapters/task-2", "bases"}
    assert plan.env["PEFT_JD_TGI_ADAPTERS"] == "task-0,task-1,task-2"


def test_hub_collection_adapter_names_must_be_folder_names(collection, tmp_path, monkeypatch):
    (collection / "adapters" / "task-0").rename(collection / "adapters" / "task 0")
    hub = FakeHub(collection, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    with pytest.raises(AdapterNameError, match="'task 0'"):
        launcher.plan_launch(["--jd-lora-collection", "org/coll@v3"], environ={})


def test_main_dry_run_error_and_exec(collection, monkeypatch, capsys):
    entry = f"t0={collection}/adapters/task-0"
    assert launcher.main(["--model-id", "m", "--jd-lora-adapters", entry, "--jd-dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["env"]["PEFT_JD_TGI_ADAPTERS"] == "t0" and printed["argv"][1:3] == ["--model-id", "m"]

    assert launcher.main(["--jd-lora-adapters", "t0=/does/not/exist"]) == 2
    assert "error: JD adapter 't0': directory '/does/not/exist' does not exist" in capsys.readouterr().err

    executed = {}
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(os, "execvp", lambda file, args: executed.update(file=file, args=args,
                                                                        env=os.environ.get("PEFT_JD_TGI")))
    monkeypatch.setenv("PEFT_JD_TGI", "0")
    for name in ("PYTHONPATH", "PEFT_JD_TGI_ADAPTERS", "PEFT_JD_TGI_BASES", "PEFT_JD_TGI_UNKNOWN_ADAPTER"):
        monkeypatch.delenv(name, raising=False)  # main() sets them before exec; restore them afterwards
    launcher.main(["--model-id", "m", "--jd-lora-adapters", entry])
    assert executed["file"] == "text-generation-launcher" and executed["env"] == "1"
    assert executed["args"][:3] == ["text-generation-launcher", "--model-id", "m"]
