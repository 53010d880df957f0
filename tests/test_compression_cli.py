"""`peft-jd compress / add / inspect` through their argparse front end."""

from __future__ import annotations

import argparse
import json

import pytest
from collection_fixtures import make_lora

from peft_jd.compression.cli import register
from peft_jd.compression.report import CompressionReport


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="peft-jd")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-loras")
    return [make_lora(root / f"task-{i}", r=2 + i, seed=i) for i in range(4)]


def test_compress_inspect_add(lora_dirs, tmp_path, capsys):
    out = tmp_path / "collection"
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in lora_dirs[:3]))
    assert run_cli(["compress", "--adapters", str(listing), "--method", "jd-full", "--rank", "4", "--clusters", "2",
                    "--out", str(out), "--quiet", "--seed", "3"]) == 0
    report = CompressionReport.load(out)
    assert report.data["settings"] | {"rank": 4, "clusters": 2, "seed": 3} == report.data["settings"]
    assert set(report.adapters) == {"task-0", "task-1", "task-2"}
    assert "mean err²" in capsys.readouterr().out

    assert run_cli(["inspect", str(out), "--modules"]) == 0
    text = capsys.readouterr().out
    assert "task-1" in text and "model.layers.1.self_attn.v_proj" in text and "64→32" in text

    assert run_cli(["add", str(out), str(lora_dirs[3]), "--quiet", "--warn-error", "1.0"]) == 0
    capsys.readouterr()
    assert run_cli(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_adapters"] == 4 and summary["bases_bytes"] > 0
    assert summary["summary"]["mean_err2"] == pytest.approx(CompressionReport.load(out).mean_err2)


def test_compress_with_target_error_and_svd(lora_dirs, tmp_path):
    out = tmp_path / "auto"
    assert run_cli(["compress", "--adapters", *map(str, lora_dirs), "--out", str(out), "--target-error", "0.3",
                    "--clusters", "1", "--quiet"]) == 0
    selection = CompressionReport.load(out).data["auto_selection"]
    assert selection["met"] and selection["probe_err2"] <= 0.3
    assert run_cli(["compress", "--adapters", *map(str, lora_dirs), "--out", str(tmp_path / "svd"), "--method",
                    "svd", "--rank", "2", "--quiet"]) == 0
    with pytest.raises(ValueError, match="svd"):
        run_cli(["add", str(tmp_path / "svd"), str(lora_dirs[0])])
