"""benchmarks/fidelity.py on the tiny model with the real compression engine, and its report helpers."""

from __future__ import annotations

import json

import fidelity
import fidelity_report
import pytest


pytestmark = pytest.mark.usefixtures("single_thread")


def test_fidelity_smoke_run_writes_json_table_plot_and_results_section(tmp_path):
    results = tmp_path / "results.md"
    results.write_text(
        "# Results\n\nintro\n\n<!-- fidelity:begin -->\nold\n<!-- fidelity:end -->\n\noutro\n"
        "<!-- headline:begin -->\nold headline\n<!-- headline:end -->\n"
    )
    argv = [
        "--smoke",
        "--methods",
        "jd-full",
        "--ranks",
        "12",
        "--clusters",
        "1",
        "--svd-ranks",
        "4",
        "--subset-sizes",
        "2",
        "--subset-ranks",
        "4",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out-dir",
        str(tmp_path / "out"),
        "--results-md",
        str(results),
    ]
    assert fidelity.main(argv) == 0
    report = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    rows = {(r["method"], r["rank"], r["n"]): r for r in report["rows"]}
    assert len(report["tasks"]) == 3 and set(report["per_task"]) == set(report["tasks"])
    # Rank 12 = 3 adapters × r 4 and SVD at rank r are lossless: same predictions as the LoRAs.
    for key in (("jd-full", 12, 3), ("svd", 4, 3), ("lora", 4, 3)):
        assert rows[key]["agreement"] == 1.0 and rows[key]["err2"] < 1e-8, key
    for task in report["per_task"].values():
        assert task["lora_teacher_forced_em"] == task["lora_em"]
    subset = rows[("jd-full", 4, 2)]
    assert 0 < subset["err2"] < 1 and len(subset["per_task_em"]) == 2
    assert rows[("jd-full", 12, 3)]["memory_ratio"] == pytest.approx(
        report["lora_params_per_adapter"] / rows[("jd-full", 12, 3)]["params_per_adapter"]
    )
    assert (tmp_path / "out" / "fidelity.png").stat().st_size > 1000
    text = results.read_text()
    assert text.startswith("# Results\n\nintro\n") and "<!-- fidelity:end -->\n\noutro\n" in text
    assert "old" not in text and "<!-- headline:begin -->\n3 LoRAs on tiny-llama" in text
    assert "--ranks 12" in text and "| jd-full | 12 | 1 | 3 |" in text and "![fidelity](out/fidelity.png)" in text


def _row(method, rank, clusters, retention, ratio, n=40):
    return {
        "method": method,
        "rank": rank,
        "clusters": clusters,
        "n": n,
        "params_per_adapter": 1e6 / ratio,
        "memory_ratio": ratio,
        "err2": 0.5,
        "exact_match": 0.8 * retention,
        "rouge_l": 0.9,
        "em_retention": retention,
        "rouge_retention": 1.0,
        "agreement": 0.97,
    }


def _report(rows):
    base = _row("base", 0, 0, 0.0, 1.0)
    lora = _row("lora", 16, 0, 1.0, 1.0)
    return {"model": "m", "tasks": [f"t{i}" for i in range(40)], "rows": [base, lora, *rows]}


def test_headline_picks_the_most_compressed_setting_that_keeps_99_percent():
    report = _report(
        [
            _row("jd-full", 16, 1, 1.0, 12.0),
            _row("jd-full", 8, 1, 0.995, 23.0),
            _row("jd-full", 4, 1, 0.90, 40.0),
            _row("jd-full", 8, 1, 1.0, 30.0, n=10),
        ]
    )
    line = fidelity_report.headline(report)
    assert "JD-Full rank 8, 1 cluster keeps 99.5%" in line and "23.0×" in line and "meets the target" in line
    falloff = "\n".join(fidelity_report.falloff(report))
    assert "≥ 99% from rank 8 (23.0×)" in falloff and "n=10: 100.0%" in falloff
    low = _report([_row("jd-diag", 8, 4, 0.95, 15.0)])
    assert "No JD setting kept ≥ 99%" in fidelity_report.headline(low)
    assert "misses" in fidelity_report.headline(_report([_row("jd-full", 64, 1, 0.995, 3.0)]))


def test_update_results_requires_markers(tmp_path):
    page = tmp_path / "results.md"
    page.write_text("# Results without markers\n")
    with pytest.raises(ValueError, match="lacks the <!-- fidelity:begin -->"):
        fidelity_report.update_results(page, "table", None, "cmd")


def test_interrupted_run_resumes_from_saved_rows(tmp_path, monkeypatch):
    argv = [
        "--smoke",
        "--methods",
        "jd-full",
        "--ranks",
        "4",
        "8",
        "--clusters",
        "1",
        "--svd-ranks",
        "4",
        "--subset-sizes",
        "0",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out-dir",
        str(tmp_path / "out"),
    ]
    real_run_setting = fidelity._run_setting
    calls = []

    def crash_on_second_setting(zoo, setting, *args, **kwargs):
        calls.append(setting.label)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real_run_setting(zoo, setting, *args, **kwargs)

    monkeypatch.setattr(fidelity, "_run_setting", crash_on_second_setting)
    with pytest.raises(RuntimeError, match="interrupted"):
        fidelity.main(argv)
    partial = json.loads((tmp_path / "out" / "fidelity.partial.json").read_text())
    assert set(partial["rows"]) == {"svd-r4", "jd-full-r4-c1-n3"}
    # What was finished is already published, marked as partial.
    so_far = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    assert so_far["complete"] is False and [r["method"] for r in so_far["rows"]] == ["base", "lora", "svd", "jd-full"]
    assert "Partial results" in (tmp_path / "out" / "fidelity.md").read_text()

    calls.clear()
    assert fidelity.main([*argv, "--resume"]) == 0
    assert calls == ["jd-full-r8-c1-n3"]
    report = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    assert report["complete"] is True and "Partial" not in (tmp_path / "out" / "fidelity.md").read_text()
    assert [(r["method"], r["rank"]) for r in report["rows"]] == [
        ("base", 0),
        ("lora", 4),
        ("svd", 4),
        ("jd-full", 4),
        ("jd-full", 8),
    ]
    assert report["rows"][3] == partial["rows"]["jd-full-r4-c1-n3"]
    assert not (tmp_path / "out" / "fidelity.partial.json").exists()

    # A file written for another test split or training setting is another experiment: nothing is reused.
    path = tmp_path / "out" / "fidelity.partial.json"
    path.write_text(json.dumps(partial))
    assert fidelity._Checkpoint(path, partial["key"], resume=True).rows == partial["rows"]
    assert fidelity._Checkpoint(path, {**partial["key"], "test_per_task": 3}, resume=True).rows == {}
    assert fidelity._Checkpoint(path, partial["key"], resume=False).rows == {}


def test_explicit_settings_replace_the_grid():
    args = fidelity.parse_args(["--settings", "jd-full:16:4", "jd-diag:64:1", "--subset-sizes", "10", "40"])
    labels = [s.label for s in fidelity.settings_grid(args, 40)]
    assert labels == ["jd-full-r16-c4-n40", "jd-diag-r64-c1-n40", "jd-full-r8-c1-n10", "jd-full-r16-c1-n10"]
    with pytest.raises(SystemExit, match="METHOD:RANK:CLUSTERS"):
        fidelity.settings_grid(fidelity.parse_args(["--settings", "jd-full-16"]), 40)
