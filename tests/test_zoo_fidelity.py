"""benchmarks/fidelity.py on the tiny model with the real compression engine, and its report helpers."""

from __future__ import annotations

import json
from pathlib import Path

import fidelity
import fidelity_report
import pytest
import torch
from safetensors.torch import load_file


pytestmark = pytest.mark.usefixtures("single_thread")


def _folders(tmp_path) -> list[str]:
    """The LoRA cache, work and output folders of a test run, under `tmp_path`."""
    return ["--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work"), "--out-dir",
            str(tmp_path / "out")]


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
        "--budgets",
        "4x",
        "1000x",
        "--peers",
        "lorashare",
        "--peers-python",
        str(tmp_path / "no-venv" / "python"),
        *_folders(tmp_path),
        "--results-md",
        str(results),
    ]
    assert fidelity.main(argv) == 0
    report = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    rows = {(r["method"], r["rank"], r["n"]): r for r in report["rows"] if not r.get("budget")}
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

    # The budgeted row: its bytes per adapter, counted here from the files (Σ of each adapter + bases / n at their
    # stored dtypes), are those recorded, and fit 1/4 of the LoRAs' bytes at fp16 (2 bytes per LoRA value).
    (budgeted,) = [r for r in report["rows"] if r.get("budget")]
    assert budgeted["method"] == "jd-full" and budgeted["n"] == 3 and budgeted["rank"] is None
    collection = tmp_path / "work" / "jd-full-b4x-c1-n3"
    assert _stored_bytes(collection, report["tasks"]) == pytest.approx(budgeted["bytes_per_adapter"])
    lora_bytes = 2 * sum(_values(p) for p in (tmp_path / "cache").rglob("adapter_model.safetensors")) / 3
    assert budgeted["bytes_per_adapter"] <= lora_bytes / 4
    assert budgeted["bytes_ratio"] == pytest.approx(lora_bytes / budgeted["bytes_per_adapter"])
    assert 0 < budgeted["err2"] < 1 and budgeted["module_ranks"]["min"] >= 1
    # The uniform rows' bytes are measured too: float32 Σ and bases by default.
    assert _stored_bytes(tmp_path / "work" / "jd-full-r12-c1-n3", report["tasks"]) == pytest.approx(
        rows[("jd-full", 12, 3)]["bytes_per_adapter"]
    )
    # A budget below the smallest collection is skipped with compress's reason; the other rows still run. No peers'
    # venv: the peer rows are skipped, and the report says why and how to create it.
    skipped = {s["label"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"jd-full-b1000x-c1-n3", "lorashare-b4x-n3", "lorashare-b1000x-n3"}
    assert "below the smallest collection" in skipped["jd-full-b1000x-c1-n3"]
    assert "peers_env.sh" in skipped["lorashare-b4x-n3"]

    text = results.read_text()
    assert text.startswith("# Results\n\nintro\n") and "<!-- fidelity:end -->\n\noutro\n" in text
    assert "old" not in text and "<!-- headline:begin -->\n3 LoRAs on tiny-llama" in text
    assert "--ranks 12" in text and "| jd-full | 12 | 1 | 3 |" in text and "![fidelity](out/fidelity.png)" in text
    assert "| jd-full | 4x: " in text and "lorashare-b4x-n3: not run" in text


def _values(path: Path) -> int:
    return sum(t.numel() for t in load_file(str(path)).values())


def _stored_bytes(collection: Path, names: list[str]) -> float:
    """Bytes per adapter of a JD collection from its files: each adapter's Σ plus the bases shared by all."""

    def size(path: Path) -> int:
        return sum(t.numel() * t.element_size() for t in load_file(str(path)).values())

    sigma = sum(size(collection / "adapters" / name / "adapter_model.safetensors") for name in names)
    return (sigma + size(collection / "bases" / "jd_bases.safetensors")) / len(names)


def _row(method, rank, clusters, retention, ratio, n=40, **extra):
    return {
        "method": method,
        "rank": rank,
        "clusters": clusters,
        "n": n,
        "params_per_adapter": 1e6 / ratio,
        "memory_ratio": ratio,
        "bytes_per_adapter": 2e6 / ratio,
        "bytes_ratio": ratio,
        "err2": 0.5,
        "exact_match": 0.8 * retention,
        "rouge_l": 0.9,
        "em_retention": retention,
        "rouge_retention": 1.0,
        "agreement": 0.97,
        **extra,
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


def test_budgeted_and_peer_rows_in_headline_falloff_table_and_plot(tmp_path):
    ranks = {"min": 4, "mean": 11.5, "max": 24}
    report = _report(
        [
            _row("jd-full", 16, 1, 0.991, 12.0),
            _row("jd-full", 8, 1, 0.95, 23.0),
            _row("jd-full", None, 1, 0.993, 16.1, budget="16x", module_ranks=ranks),
            _row("jd-full", None, 1, 0.97, 32.2, budget="32x", module_ranks=ranks),
            _row("lorashare", 16, 0, 0.92, 16.2, budget="16x", setting={"num_components": 16}),
            _row("lorashare", 8, 0, 0.85, 32.4, budget="32x", setting={"num_components": 8}),
            _row("svd", 4, 0, 0.999, 4.0),
        ]
    )
    report["skipped"] = [{"label": "vlora-b32x-n40", "reason": "no setting fits: …"}]
    # The budgeted row keeps ≥ 99% at the highest ratio: it is the headline.
    assert "JD-Full at budget 16x, 1 cluster keeps 99.3%" in fidelity_report.headline(report)
    assert fidelity_report.byte_targets(report) == (
        "Targets in bytes per adapter (LoRAs at fp16, bases amortized): ≥ 99% at ≥ 16×: met, best JD-Full at budget "
        "16x, 1 cluster with 99.3% at 16.1×; ≥ 97% at ≥ 32×: met, best JD-Full at budget 32x, 1 cluster with 97.0% at "
        "32.2×."
    )
    missed = _report([_row("jd-diag", 38, 1, 0.963, 15.99), _row("jd-diag", 8, 1, 0.99, 12.0)])
    expected = "≥ 99% at ≥ 16×: missed, best JD-Diag rank 38, 1 cluster with 96.3% at 16.0×; ≥ 97% at ≥ 32×: no JD row"
    assert expected in fidelity_report.byte_targets(missed)
    falloff = fidelity_report.falloff(report)
    assert "- JD-Full, 1 cluster(s): ≥ 99% from rank 16 (12.0×); EM kept by rank: r8: 95.0%, r16: 99.1%." in falloff
    assert (
        "- JD-Full with a budget, 1 cluster(s), at equal bytes per adapter: EM kept 32x (32.2×): 97.0%, "
        "16x (16.1×): 99.3%." in falloff
    )
    assert (
        "- lorashare (SHARE), at equal bytes per adapter: EM kept 32x (32.4×, k=8): 85.0%, 16x (16.2×, k=16): 92.0%."
        in falloff
    )
    assert "- vlora-b32x-n40: not run, no setting fits: …." in falloff
    cells = {r["method"] + str(r["rank"]): fidelity_report._rank_cell(r) for r in report["rows"]}
    assert cells["jd-fullNone"] in ("16x: 4–24", "32x: 4–24") and cells["lorashare16"] == "k=16 @ 16x"
    assert fidelity_report._bytes_cell(report["rows"][2]) == "166.7 kB (12.0×)"

    plot = fidelity_report.write_budget_plot(report, tmp_path / "budget.png")
    assert plot == tmp_path / "budget.png" and plot.stat().st_size > 1000
    without = _report([_row("jd-full", 16, 1, 0.991, 12.0)])
    assert fidelity_report.write_budget_plot(without, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    lines = sorted({fidelity_report._line_label(r) for r in report["rows"][2:]})
    assert lines == [
        "JD-Full, budget, 1 cluster(s)",
        "JD-Full, uniform rank, 1 cluster(s)",
        "lorashare (SHARE)",
        "per-adapter SVD",
    ]
    page = tmp_path / "results.md"
    page.write_text("<!-- fidelity:begin -->\n<!-- fidelity:end -->\n")
    fidelity_report.update_results(page, "table\n", [tmp_path / "a.png", plot], "cmd")
    assert page.read_text().endswith("table\n\n![a](a.png)\n\n![budget](budget.png)\n<!-- fidelity:end -->\n")


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
        "--sigma-dtype",
        "float16",
        "--bases-dtype",
        "float16",
        *_folders(tmp_path),
    ]
    real_run_setting = fidelity.run_setting
    calls = []

    def crash_on_second_setting(zoo, setting, *args, **kwargs):
        calls.append(setting.label)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real_run_setting(zoo, setting, *args, **kwargs)

    monkeypatch.setattr(fidelity, "run_setting", crash_on_second_setting)
    with pytest.raises(RuntimeError, match="interrupted"):
        fidelity.main(argv)
    partial = json.loads((tmp_path / "out" / "fidelity.partial.json").read_text())
    assert set(partial["rows"]) == {"svd-r4", "jd-full-r4-c1-n3"}
    # What was finished is already published, marked as partial.
    so_far = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    assert so_far["complete"] is False and [r["method"] for r in so_far["rows"]] == ["base", "lora", "svd", "jd-full"]
    assert "Partial results" in (tmp_path / "out" / "fidelity.md").read_text()

    calls.clear()
    evaluated = []
    real_evaluate = fidelity.evaluate
    monkeypatch.setattr(fidelity, "evaluate", lambda *a, **k: evaluated.append(k["desc"]) or real_evaluate(*a, **k))
    assert fidelity.main([*argv, "--resume"]) == 0
    assert calls == ["jd-full-r8-c1-n3"]
    # The base and LoRA evaluations of the interrupted run were kept in the zoo cache and reused.
    assert evaluated == [] and len(list((tmp_path / "cache" / "fidelity-reference").glob("*.json"))) == 1
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
    # --sigma-dtype/--bases-dtype reach every JD collection: stored as float16, 2 bytes per value in the row.
    bases = load_file(str(tmp_path / "work" / "jd-full-r8-c1-n3" / "bases" / "jd_bases.safetensors"))
    assert {t.dtype for t in bases.values()} == {torch.float16}
    row = report["rows"][4]
    assert row["sigma_dtype"] == row["bases_dtype"] == "float16"
    assert row["bytes_per_adapter"] == pytest.approx(2 * row["params_per_adapter"])
    assert partial["key"]["storage"] == {"sigma_dtype": "float16", "bases_dtype": "float16"}

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


def test_settings_without_values_leave_only_the_budgeted_rows():
    args = fidelity.parse_args(["--settings", "--subset-sizes", "0", "--methods", "jd-diag", "--budgets", "16x"])
    assert [s.label for s in fidelity.settings_grid(args, 40)] == ["jd-diag-b16x-c1-n40"]


def test_budgets_add_one_setting_per_method_budget_and_cluster_count(capsys):
    args = fidelity.parse_args(
        ["--settings", "jd-full:16:1", "--subset-sizes", "0", "--budgets", "16x", "150KB", "--methods", "jd-full"]
    )
    labels = [s.label for s in fidelity.settings_grid(args, 40)]
    assert labels == ["jd-full-r16-c1-n40", "jd-full-b16x-c1-n40", "jd-full-b150KB-c1-n40"]
    for argv, message in (
        (["--budgets", "0x"], "cannot read budget '0x'"),
        (["--budgets", "sixteen"], "cannot read budget"),
        (["--peers", "vlora"], "give the --budgets"),
        (["--budgets", "8x", "--peers", "other"], "invalid choice"),
    ):
        with pytest.raises(SystemExit):
            fidelity.parse_args(argv)
        assert message in capsys.readouterr().err, argv


def test_reference_cache_misses_when_a_lora_or_the_batch_size_changes(tmp_path):
    from fidelity_reference import load_reference, reference_key, save_reference

    from peft_jd.zoo import EvalResult

    lora = tmp_path / "task_a"
    lora.mkdir()
    (lora / "adapter_model.safetensors").write_bytes(b"weights")
    key = {"tasks": ["task_a"], "test_per_task": 4}
    digest = reference_key(key, {"task_a": lora}, 64)
    assert load_reference(tmp_path, digest) is None
    base = EvalResult(["x"], {"task_a": {"exact_match": 0.0, "rouge_l": 0.1, "n": 1}}, 1.0, 3)
    lora_result = EvalResult(["y"], {"task_a": {"exact_match": 1.0, "rouge_l": 1.0, "n": 1}}, 2.0, 4)
    save_reference(tmp_path, digest, base, lora_result, {"task_a": 1.0})
    assert load_reference(tmp_path, digest) == (base, lora_result, {"task_a": 1.0})
    assert reference_key(key, {"task_a": lora}, 32) != digest
    assert reference_key({**key, "test_per_task": 5}, {"task_a": lora}, 64) != digest
    (lora / "adapter_model.safetensors").write_bytes(b"retrained")
    assert reference_key(key, {"task_a": lora}, 64) != digest


def test_fallback_error_reaches_every_jd_row_and_counts_the_private_pairs(tmp_path):
    argv = ["--smoke", "--methods", "jd-diag", "--ranks", "2", "--clusters", "1", "--svd-ranks", "0",
            "--subset-sizes", "0", "--budgets", "2x", "--fallback-error", "0.05", "--sigma-dtype", "float16",
            "--bases-dtype", "float16", *_folders(tmp_path)]
    assert fidelity.main(argv) == 0
    report = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    jd_rows = [r for r in report["rows"] if r["method"] == "jd-diag"]
    assert len(jd_rows) == 2 and report["storage"]["fallback_error"] == 0.05
    for row in jd_rows:
        label = f"jd-diag-{'b2x' if row.get('budget') else 'r2'}-c1-n3"
        compressed = json.loads((tmp_path / "work" / label / "report.json").read_text())
        assert compressed["settings"]["fallback_error"] == 0.05
        pairs = sum(len(m.get("fallback", [])) for m in compressed["modules"].values())
        # Rank 2 of three rank-4 LoRAs cannot stay under 5% error: some pairs fall back, and the row says how many.
        assert row["fallback_pairs"] == pairs > 0


def test_merge_combines_runs_on_the_same_loras_and_refuses_others(tmp_path):
    import fidelity_merge

    common = ["--smoke", "--methods", "jd-diag", "--settings", "--svd-ranks", "0", "--subset-sizes", "0",
              "--budgets", "2x", "--sigma-dtype", "float16", "--bases-dtype", "float16", "--resume",
              "--cache-dir", str(tmp_path / "cache")]
    plain, energy = tmp_path / "plain", tmp_path / "energy"
    assert fidelity.main([*common, "--out-dir", str(plain), "--work-dir", str(plain / "work")]) == 0
    assert fidelity.main([*common, "--allocation-weighting", "energy", "--out-dir", str(energy),
                          "--work-dir", str(energy / "work")]) == 0
    out = tmp_path / "merged"
    reports = [str(plain / "fidelity.json"), str(energy / "fidelity.json")]
    assert fidelity_merge.main([*reports, "--out-dir", str(out)]) == 0
    merged = json.loads((out / "fidelity.json").read_text())
    assert [(r["method"], r.get("allocation_weighting")) for r in merged["rows"]] == [
        ("base", None), ("lora", None), ("jd-diag", None), ("jd-diag", "energy")]
    table = (out / "fidelity.md").read_text()
    assert "| jd-diag | 2x:" in table and "| jd-diag (energy-weighted) | 2x:" in table

    other = json.loads((energy / "fidelity.json").read_text())
    other["test_per_task"] += 1
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="test_per_task differs"):
        fidelity_merge.main([str(plain / "fidelity.json"), str(tmp_path / "other.json"), "--out-dir", str(out)])
