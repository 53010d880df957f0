"""hub_tools against the local Hub: push → pull → `PeftModel.from_pretrained` → mixed-batch generate, for both layouts
and both upload paths; idempotent and resumable pushes; pinned, verified, cache-shared bases; offline use; errors.

Outputs are compared with an independent reference: the base model with `W + U Σ Vᵀ` added to each target weight,
built from the raw tensors `make_collection` returned (not from anything hub_tools or peft_jd computed).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time

import pytest
import torch
from collection_fixtures import write_report
from hub_server import READ_TOKEN, UPLOAD_MODES, set_offline
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from peft import PeftModel
from utils import dense_delta, make_collection, target_linears, tiny_llama

import peft_jd
from hub_tools import (
    HubAuthError,
    PullError,
    PushError,
    list_collection,
    pull_adapter,
    pull_collection,
    push_collection,
)
from peft_jd.core import BASES_WEIGHTS_NAME, BasesConfig, BasesMismatchError, BasesNotFoundError, write_sigma_adapter
from peft_jd.tuner.config import JDLoraConfig


pytest_plugins = ["hub_server.fixtures"]

LAYOUTS = ("repos", "subfolders")
INPUT_IDS = torch.tensor([[5, 17, 42, 9, 3], [7, 7, 99, 1, 64], [11, 2, 3, 4, 5], [120, 6, 30, 8, 2]])
# Squared relative reconstruction error per adapter, written as a `peft-jd compress` report.
ERRORS = {"task-0": 0.125, "task-1": 0.25, "task-2": 0.5}


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("collection")
    data = make_collection(root, tiny_llama(), n_adapters=3, r=4, clusters=2)
    write_report(root, ERRORS)
    return root, data


def _push(root, layout: str, **kwargs):
    if layout == "repos":
        return push_collection(root, bases_repo="org/bases", adapter_repo="org/{name}-jd", progress=False, **kwargs)
    return push_collection(root, repo="org/collection", progress=False, **kwargs)


def _location(layout: str, name: str) -> tuple[str, str | None]:
    return (f"org/{name}-jd", None) if layout == "repos" else ("org/collection", f"adapters/{name}")


@torch.no_grad()
def _reference_model(data, adapter):
    model = tiny_llama()
    if adapter is not None:
        for key, linear in target_linears(model).items():
            linear.weight += dense_delta(data, adapter, key)
    return model


def _check_mixed_batch(model, data, names: list[str], adapters: list[str | None]) -> None:
    """Mixed-batch forward and greedy generate match the merged-weights reference row by row."""
    with torch.no_grad():
        logits = model(input_ids=INPUT_IDS, adapter_names=names).logits
        generated = model.generate(
            input_ids=INPUT_IDS,
            attention_mask=torch.ones_like(INPUT_IDS),
            adapter_names=names,
            max_new_tokens=4,
            do_sample=False,
        )
        for row, adapter in enumerate(adapters):
            reference = _reference_model(data, adapter)
            expected = reference(input_ids=INPUT_IDS[row : row + 1]).logits[0]
            torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4)
            expected_tokens = reference.generate(
                input_ids=INPUT_IDS[row : row + 1],
                max_new_tokens=4,
                attention_mask=torch.ones_like(INPUT_IDS[row : row + 1]),
                do_sample=False,
            )
            assert generated[row].tolist() == expected_tokens[0].tolist()


@pytest.mark.parametrize("hub", UPLOAD_MODES, indirect=True)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_push_pull_from_pretrained_mixed_generate(hub, collection, layout):
    root, data = collection
    result = _push(root, layout)
    assert result.bases_uploaded and result.uploaded == ["task-0", "task-1", "task-2"]

    # The pinned commit holds exactly the local bases, and each Hub config points there.
    bases_prefix = "" if layout == "repos" else "bases/"
    pinned = hub.file_bytes(result.bases_repo, bases_prefix + BASES_WEIGHTS_NAME, revision=result.bases_revision)
    assert hashlib.sha256(pinned).hexdigest() == data["fingerprint"]
    assert pinned == (root / "bases" / BASES_WEIGHTS_NAME).read_bytes()
    for name in data["sigmas"]:
        repo_id, subfolder = _location(layout, name)
        config = json.loads(hub.file_bytes(repo_id, f"{subfolder + '/' if subfolder else ''}adapter_config.json"))
        expected_bases = "org/bases" if layout == "repos" else "../../bases"
        assert (config["bases"], config["bases_revision"], config["bases_subfolder"]) == (
            expected_bases,
            result.bases_revision,
            None,
        )
        assert config["bases_fingerprint"] == data["fingerprint"]

    pulled = pull_adapter(*_location(layout, "task-0")[:1], subfolder=_location(layout, "task-0")[1])
    assert pulled.fingerprint == data["fingerprint"] and pulled.bases_revision == result.bases_revision
    assert (pulled.bases_dir / BASES_WEIGHTS_NAME).read_bytes() == pinned

    repo_id, subfolder = _location(layout, "task-0")
    model = PeftModel.from_pretrained(tiny_llama(), repo_id, subfolder=subfolder)
    if layout == "repos":
        loaded = peft_jd.load_adapters(model, ["org/task-1-jd", "org/task-2-jd"], progress=False)
    else:
        model.load_adapter("org/collection", adapter_name="task-1", subfolder="adapters/task-1")
        loaded = ["task-1"] + peft_jd.load_adapters(
            model, ["org/collection"], subfolders=["adapters/task-2"], progress=False
        )
    _check_mixed_batch(
        model, data, ["default", loaded[1], "__base__", loaded[0]], ["task-0", "task-2", None, "task-1"]
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_repush_of_unchanged_collection_uploads_nothing(hub, collection, layout):
    root, _ = collection
    first = _push(root, layout)
    commits = {repo: hub.commits(repo) for _, repo in hub.store.repos}
    uploaded = hub.uploaded_bytes()
    second = _push(root, layout)
    assert second.uploaded == [] and not second.bases_uploaded
    assert second.bases_revision == first.bases_revision
    assert {repo: hub.commits(repo) for _, repo in hub.store.repos} == commits
    assert hub.uploaded_bytes() == uploaded


def test_interrupted_push_resumes(hub, collection):
    root, _ = collection
    hub.inject_fault("POST", r"^/api/models/org/task-1-jd/commit/", "drop")
    with pytest.raises(PushError, match="task-1") as exc_info:
        _push(root, "repos")
    assert "Re-run" in str(exc_info.value)
    # No half-state presented as complete: the index and card come last and were not written.
    assert "jd_collection.json" not in hub.repo("org/bases").resolve("main").files
    resumed = _push(root, "repos")
    assert resumed.uploaded == ["task-1"] and not resumed.bases_uploaded
    assert sorted(json.loads(hub.file_bytes("org/bases", "jd_collection.json"))["adapters"]) == [
        "task-0",
        "task-1",
        "task-2",
    ]


def test_interrupted_single_repo_push_resumes(hub, collection):
    root, _ = collection
    # Commits of the push: bases, adapter batch 1 (task-0), adapter batch 2 (task-1) <- fails, batch 3 (task-2).
    hub.inject_fault("POST", r"^/api/models/org/collection/commit/", 500, after=2)
    with pytest.raises(PushError, match="task-1"):
        push_collection(root, repo="org/collection", adapters_per_commit=1, progress=False)
    files = hub.repo("org/collection").resolve("main").files
    assert "adapters/task-0/adapter_model.safetensors" in files and "adapters/task-1/adapter_config.json" not in files
    resumed = push_collection(root, repo="org/collection", adapters_per_commit=1, progress=False)
    assert resumed.uploaded == ["task-1", "task-2"] and not resumed.bases_uploaded


def test_network_failure_during_bases_upload_is_explained(hub, collection):
    root, _ = collection
    hub.inject_fault("POST", r"^/api/models/org/collection/commit/", "drop")
    with pytest.raises(PushError, match="Re-run the same push"):
        _push(root, "subfolders")
    assert list(hub.repo("org/collection").resolve("main").files) == [".gitattributes"]
    assert _push(root, "subfolders").bases_uploaded


@pytest.mark.parametrize("layout", LAYOUTS)
def test_push_after_add_uploads_only_new_adapter(hub, collection, layout, tmp_path):
    root, data = collection
    copy = tmp_path / "collection"
    shutil.copytree(root, copy)
    first = _push(copy, layout)
    bases = BasesConfig.from_file(copy / "bases" / "jd_bases_config.json")
    config = JDLoraConfig(
        r=4,
        sigma_type="full",
        target_modules=["q_proj", "k_proj", "v_proj"],
        bases="../../bases",
        bases_fingerprint=bases.fingerprint,
        cluster=1,
        base_model_name_or_path="tiny-llama",
        task_type="CAUSAL_LM",
    )
    write_sigma_adapter(copy / "adapters" / "task-3", data["sigmas"]["task-1"], config)
    second = _push(copy, layout)
    assert second.uploaded == ["task-3"] and not second.bases_uploaded
    assert second.bases_revision == first.bases_revision
    listing = list_collection("org/bases" if layout == "repos" else "org/collection")
    assert [a.name for a in listing.adapters] == ["task-0", "task-1", "task-2", "task-3"]


def _settled_request_count(hub) -> int:
    """Requests logged so far. The server logs a request after writing its response, so the client can be one request
    ahead of the log for a moment: wait until the log stops growing."""
    count = -1
    while count != len(hub.requests):
        count = len(hub.requests)
        time.sleep(0.05)
    return count


def test_pull_shares_one_bases_download_and_local_dir_works_offline(hub, collection, tmp_path, monkeypatch):
    root, data = collection
    _push(root, "repos")
    local = tmp_path / "local"
    pulled = pull_collection("org/bases", local_dir=local)
    assert sorted(pulled) == ["task-0", "task-1", "task-2"]
    assert hub.count("GET", r"jd_bases\.safetensors$") == 1  # one download for three adapters
    PeftModel.from_pretrained(tiny_llama(), "org/task-2-jd")  # served from the cache too
    assert hub.count("GET", r"jd_bases\.safetensors$") == 1

    set_offline(monkeypatch)
    requests = _settled_request_count(hub)
    model = PeftModel.from_pretrained(tiny_llama(), str(local / "adapters" / "task-1"))
    peft_jd.load_adapters(model, [str(local / "adapters" / n) for n in ("task-0", "task-2")], progress=False)
    _check_mixed_batch(model, data, ["task-0", "default", "__base__", "task-2"], ["task-0", "task-1", None, "task-2"])
    # Offline, from the cache, by repo id: no request reaches the Hub.
    model = PeftModel.from_pretrained(tiny_llama(), "org/task-0-jd")
    assert pull_adapter("org/task-0-jd").fingerprint == data["fingerprint"]
    assert len(hub.requests) == requests
    with pytest.raises(PullError, match="offline|unreachable"):
        pull_adapter("org/task-9-jd")


def test_pull_errors_missing_repo_revision_and_collection_root(hub, collection):
    root, _ = collection
    _push(root, "subfolders")
    with pytest.raises(PullError, match="not found"):
        pull_adapter("org/does-not-exist")
    with pytest.raises(PullError, match="no revision"):
        pull_adapter("org/collection", subfolder="adapters/task-0", revision="no-such-branch")
    with pytest.raises(PullError, match="subfolder='adapters/<name>'"):
        pull_adapter("org/collection")
    with pytest.raises(PullError, match="task-7"):
        pull_collection("org/collection", names=["task-7"])


def test_bases_revision_gone_is_an_error_not_a_fallback(hub, collection):
    root, _ = collection
    result = _push(root, "repos")
    HfApi().super_squash_history("org/bases")
    with pytest.raises(BasesNotFoundError, match=result.bases_revision):
        pull_adapter("org/task-0-jd")
    with pytest.raises(BasesNotFoundError):
        PeftModel.from_pretrained(tiny_llama(), "org/task-0-jd")


def test_unpinned_adapter_uses_current_bases_commit(hub, collection, caplog):
    root, data = collection
    result = _push(root, "repos")
    config = json.loads((root / "adapters" / "task-0" / "adapter_config.json").read_text())
    config.update(bases="org/bases", bases_revision=None)
    api = HfApi()
    api.create_repo("org/hand-made")
    weights = str(root / "adapters" / "task-0" / "adapter_model.safetensors")
    api.create_commit(
        "org/hand-made",
        [
            CommitOperationAdd("adapter_config.json", json.dumps(config).encode()),
            CommitOperationAdd("adapter_model.safetensors", weights),
        ],
        commit_message="uploaded by hand",
    )
    pulled = pull_adapter("org/hand-made")
    assert pulled.bases_revision == hub.head("org/bases") != result.bases_revision
    assert pulled.fingerprint == data["fingerprint"] and "does not pin its bases revision" in caplog.text


def test_bases_integrity_is_checked(hub, collection, tmp_path):
    root, _ = collection
    _push(root, "repos")
    pulled = pull_adapter("org/task-0-jd")
    # An adapter whose recorded fingerprint disagrees with the bases it pins is refused.
    config = json.loads(hub.file_bytes("org/task-1-jd", "adapter_config.json"))
    config["bases_fingerprint"] = "0" * 64
    HfApi().create_commit(
        "org/task-1-jd",
        [CommitOperationAdd("adapter_config.json", json.dumps(config).encode())],
        commit_message="tamper",
    )
    with pytest.raises(BasesMismatchError, match="records 000000000000"):
        pull_adapter("org/task-1-jd")
    # A corrupted cache file is detected, not loaded.
    weights = (pulled.bases_dir / BASES_WEIGHTS_NAME).resolve()
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(BasesMismatchError, match="corrupt"):
        pull_adapter("org/task-2-jd")


def test_network_failure_mid_pull_leaves_nothing_and_retry_works(hub, collection, tmp_path):
    root, data = collection
    _push(root, "repos")
    local = tmp_path / "local"
    hub.inject_fault("GET", r"jd_bases\.safetensors$", 500)
    with pytest.raises(PullError, match="HTTP 500"):
        pull_adapter("org/task-0-jd", local_dir=local)
    assert not (local / "bases").exists() and not (local / "adapters").exists()
    # A connection cut mid-body is retried by huggingface_hub, and the result verified by us.
    hub.inject_fault("GET", r"jd_bases\.safetensors$", "truncate")
    pulled = pull_adapter("org/task-0-jd", local_dir=local)
    assert pulled.fingerprint == data["fingerprint"]
    assert [r.status for r in hub.requests if r.method == "GET" and r.path.endswith(BASES_WEIGHTS_NAME)] == [
        500,
        200,
        200,
    ]
    assert (local / "adapters" / "task-0-jd" / "adapter_model.safetensors").is_file()


def test_local_dir_refuses_mixing_bases(hub, collection, tmp_path):
    root, _ = collection
    _push(root, "repos")
    other = tmp_path / "other"
    make_collection(other, tiny_llama(), n_adapters=1, r=4, seed=7)
    push_collection(other, bases_repo="org/other-bases", adapter_repo="org/{name}-other", progress=False)
    pull_adapter("org/task-0-jd", local_dir=tmp_path / "local")
    with pytest.raises(BasesMismatchError, match="one bases revision"):
        pull_adapter("org/task-0-other", local_dir=tmp_path / "local")


def test_auth_failures_are_explained(hub, collection, monkeypatch):
    root, _ = collection
    monkeypatch.setenv("HF_TOKEN", "hf_invalid")
    with pytest.raises(HubAuthError, match="rejected your token"):
        _push(root, "repos")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubAuthError, match="no Hugging Face token"):
        _push(root, "repos")
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    with pytest.raises(HubAuthError, match="write access"):
        _push(root, "repos")
    assert not hub.store.repos


def test_private_push_needs_token_to_pull(hub, collection, monkeypatch):
    root, _ = collection
    _push(root, "subfolders", private=True)
    assert hub.repo("org/collection").private
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PullError, match="private"):
        pull_adapter("org/collection", subfolder="adapters/task-0")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cards_listing_and_report(hub, collection, layout):
    root, data = collection
    result = _push(root, layout)
    index_repo = result.bases_repo
    card = ModelCard(hub.file_bytes(index_repo, "README.md").decode())
    assert card.data.library_name == "peft" and card.data.base_model == "tiny-llama" and "jdlora" in card.data.tags
    assert data["fingerprint"] in card.text and result.bases_revision in card.text
    assert "task-2" in card.text and "mean_err2 0.5" in card.text
    if layout == "repos":
        sigma = ModelCard(hub.file_bytes("org/task-1-jd", "README.md").decode())
        assert sigma.data.base_model == "tiny-llama" and sigma.data.base_model_relation == "adapter"
        assert f"/org/bases/tree/{result.bases_revision}" in sigma.text and "mean_err2 0.25" in sigma.text

    listing = list_collection(index_repo)
    assert listing.layout == layout and listing.bases["revision"] == result.bases_revision
    assert [(a.name, a.cluster, a.figures.get("mean_err2")) for a in listing.adapters] == [
        ("task-0", 0, 0.125),
        ("task-1", 1, 0.25),
        ("task-2", 0, 0.5),
    ]
    assert listing.report.mean_figures()["mean_err2"] == pytest.approx(sum(ERRORS.values()) / len(ERRORS))
    if layout == "repos":
        single = list_collection("org/task-0-jd")
        assert single.kind == "adapter" and single.bases["revision"] == result.bases_revision
