"""`peft-jd push / pull / ls` through `hub_tools.cli.register`, plus how they read `report.json` and the cards."""

from __future__ import annotations

import argparse
import json
import logging

import pytest
from collection_fixtures import write_report
from huggingface_hub import HfApi
from utils import make_collection, tiny_llama

from hub_tools import list_collection
from hub_tools.cli import register
from hub_tools.errors import CollectionError
from hub_tools.local import read_collection
from peft_jd.compression.cards import collection_card, human_size
from peft_jd.compression.report import CompressionReport
from peft_jd.core import BasesConfig


pytest_plugins = ["hub_server.fixtures"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-collection")
    make_collection(root, tiny_llama(), n_adapters=3, r=4, clusters=2)
    write_report(root, {"task-0": 0.1, "task-1": 0.2, "task-2": 0.3})
    return root


def run(argv: list[str], capsys, status: int = 0) -> str:
    """Runs a subcommand; returns stdout, or stderr when a non-zero `status` is expected."""
    parser = argparse.ArgumentParser(prog="peft-jd")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    assert args.func(args) == status
    captured = capsys.readouterr()
    return captured.err if status else captured.out


def test_push_ls_pull_one_repo_per_adapter(hub, collection, tmp_path, capsys):
    push = ["push", str(collection), "--bases-repo", "org/bases", "--adapter-repo", "org/{name}-jd", "--no-progress"]
    out = run(push, capsys)
    assert "adapters: 3 uploaded, 0 unchanged" in out and "(uploaded)" in out
    out = run(push, capsys)
    assert "adapters: 0 uploaded, 3 unchanged" in out and "(unchanged)" in out

    out = run(["ls", "org/bases"], capsys)
    lines = out.splitlines()
    assert "layout: repos" in lines[0] and "base model: tiny-llama" in out
    row = next(line for line in lines if line.startswith("task-1 "))
    assert "org/task-1-jd" in row and " 1 " in row and "mean_err2=0.2" in row and "max_err2=0.2" in row
    assert lines[-2].startswith("mean over the collection: max_adapter_err2=0.3 ") and "mean_err2=0.2" in lines[-2]
    assert lines[-1] == "3 adapter(s)"
    listing = json.loads(run(["ls", "org/bases", "--json"], capsys))
    assert [a["name"] for a in listing["adapters"]] == ["task-0", "task-1", "task-2"]

    out = run(["pull", "org/task-1-jd", "--local-dir", str(tmp_path / "local")], capsys)
    assert f"task-1-jd\t{tmp_path / 'local' / 'adapters' / 'task-1-jd'}" in out and "verified" in out
    assert (tmp_path / "local" / "bases" / "jd_bases.safetensors").is_file()


def test_push_single_repo_and_pull_all(hub, collection, tmp_path, capsys):
    out = run(["push", str(collection), "--repo", "org/collection", "--private", "--no-progress"], capsys)
    assert "bases: org/collection/bases @" in out and hub.repo("org/collection").private
    out = run(["pull", "org/collection", "--all", "--local-dir", str(tmp_path / "all")], capsys)
    assert sorted(line.split("\t")[0] for line in out.splitlines() if "\t" in line) == ["task-0", "task-1", "task-2"]
    out = run(["pull", "org/collection", "--subfolder", "adapters/task-2"], capsys)
    assert out.startswith("task-2\t") and "org/collection/bases @" in out
    out = run(["pull", "org/collection", "--subfolder", "adapters/task-2", "--offline"], capsys)
    assert out.startswith("task-2\t")


def test_push_argument_errors(hub, collection, tmp_path, capsys):
    # Contradictory arguments: one line on stderr, exit status 2.
    err = run(["push", str(collection), "--repo", "org/a", "--bases-repo", "org/b"], capsys, status=2)
    assert err.startswith("error: choose one layout") and err.count("\n") == 1
    err = run(["push", str(collection), "--bases-repo", "org/b", "--adapter-repo", "org/fixed"], capsys, status=2)
    assert "must contain" in err and err.count("\n") == 1
    assert "not both" in run(["pull", "org/a", "--all", "--adapters", "x"], capsys, status=2)
    assert "--local-dir" in run(["pull", "org/a", "--overwrite"], capsys, status=2)
    with pytest.raises(CollectionError, match="not a compressed collection"):
        run(["push", str(tmp_path), "--repo", "org/a"], capsys)
    with pytest.raises(CollectionError, match="task-8"):
        run(["push", str(collection), "--repo", "org/a", "--adapters", "task-8"], capsys)
    assert not hub.store.repos


def test_push_refuses_adapter_of_other_bases(hub, tmp_path, capsys):
    root = tmp_path / "mixed"
    make_collection(root, tiny_llama(), n_adapters=1, r=4)
    config = json.loads((root / "adapters" / "task-0" / "adapter_config.json").read_text())
    config["bases_fingerprint"] = "f" * 64
    (root / "adapters" / "task-0" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CollectionError, match="peft-jd add"):
        run(["push", str(root), "--repo", "org/a"], capsys)


def test_local_report_is_the_compression_report(tmp_path):
    root = tmp_path / "col"
    make_collection(root, tiny_llama(), n_adapters=2, r=4, clusters=2)
    write_report(root, {"task-0": 0.25, "task-1": 0.75})
    report = read_collection(root).report
    assert report == CompressionReport.load(root) and report.path == root / "report.json"
    assert report.adapters["task-1"]["cluster"] == 1
    # Every module of task-1 has err² 0.75, so its mean err is sqrt(0.75); the collection mean is (0.25 + 0.75) / 2.
    assert report.adapter_figures("task-1") == pytest.approx({"mean_err2": 0.75, "mean_err": 0.75**0.5,
                                                              "max_err2": 0.75})
    assert report.mean_figures()["mean_err2"] == pytest.approx(0.5)
    # Push uploads the local report as it is, so one that is not a peft-jd compression report is refused.
    for content, message in (("{truncated", "not valid JSON"), ('{"adapters": {}}', "not a peft-jd compression")):
        (root / "report.json").write_text(content)
        with pytest.raises(CollectionError, match=message):
            read_collection(root)
    (root / "report.json").unlink()
    assert read_collection(root).report is None


@pytest.mark.parametrize("content, message", [(b'{"adapters": {"task-0": {"rel_error": 0.5}}}',
                                               "not a peft-jd compression report"),
                                              (b'["not", "an", "object"]', "must hold a JSON object"),
                                              (b"{truncated", "not a JSON file")])
def test_ls_ignores_a_pushed_report_of_another_shape(hub, collection, capsys, caplog, content, message):
    run(["push", str(collection), "--repo", "org/collection", "--no-progress"], capsys)
    HfApi().upload_file(path_or_fileobj=content, path_in_repo="report.json", repo_id="org/collection")
    with caplog.at_level(logging.WARNING):
        listing = list_collection("org/collection")
        out = run(["ls", "org/collection"], capsys)
    assert message in caplog.text and "listing without the compression report" in caplog.text
    assert listing.report is None and [a.figures for a in listing.adapters] == [{}, {}, {}]
    assert "mean over the collection" not in out and out.splitlines()[-1] == "3 adapter(s)"
    assert next(line for line in out.splitlines() if line.startswith("task-0 ")).endswith("  -")


def test_collection_card_truncates_long_tables():
    bases = BasesConfig(r=4, sigma_type="diag", num_clusters=1, base_model_name_or_path=None, target_modules=[],
                        modules={}, fingerprint="ab" * 32)
    adapters = {f"t{i:03d}": {"repo": f"org/t{i:03d}", "subfolder": None, "cluster": 0} for i in range(105)}
    card = collection_card("org/bases", bases, 1234567, "c" * 40, adapters, None)
    assert card.startswith("---\nlibrary_name: peft\n") and "base_model" not in card.split("---")[1]
    assert "| t099 |" in card and "| t100 |" not in card and "and 5 more" in card and "1.2 MB" in card
    assert [human_size(n) for n in (999, 1000, 2_500_000_000)] == ["999 B", "1.0 kB", "2.5 GB"]
