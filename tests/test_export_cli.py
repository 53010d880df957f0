"""`peft-jd export-lora`: the written LoRA reproduces the JD adapter's forward through PEFT's own LoRA; the adapter
is validated like every loader's; an existing OUT is replaced only when it is safe to."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from utils import edit_adapter_config, make_collection, tiny_llama

import peft_jd
from peft_jd.cli import main
from peft_jd.core import ADAPTER_WEIGHTS_NAME
from peft_jd.export import export_adapter_to_lora


@pytest.fixture()
def adapter(tmp_path):
    make_collection(tmp_path / "c", tiny_llama(), n_adapters=1, r=4, clusters=2, sigma_type="diag")
    return tmp_path / "c" / "adapters" / "task-0"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["export-lora", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, pattern: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert pattern in err, err


def test_export_lora_command_writes_an_exact_peft_lora(tmp_path, adapter, capsys):
    code, out, _ = run(capsys, adapter, tmp_path / "lora")
    assert code == 0 and "wrote PEFT LoRA (r=4" in out
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        jd = PeftModel.from_pretrained(tiny_llama(), str(adapter))(input_ids=ids).logits
        lora = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lora"))(input_ids=ids).logits
    torch.testing.assert_close(lora, jd, atol=1e-5, rtol=1e-5)


def test_export_lora_command_reports_missing_adapter(tmp_path, capsys):
    code, _, err = run(capsys, tmp_path / "nope", tmp_path / "out")
    assert code == 1
    assert_one_line_error(err, "nope")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cluster", [-1, 2, 99])
def test_cluster_out_of_range_is_a_bases_mismatch(tmp_path, adapter, capsys, cluster):
    edit_adapter_config(adapter, cluster=cluster)
    with pytest.raises(peft_jd.BasesMismatchError, match=f"cluster {cluster} .* 2 cluster"):
        export_adapter_to_lora(str(adapter))
    code, _, err = run(capsys, adapter, tmp_path / "out")
    assert code == 1 and not (tmp_path / "out").exists()
    assert_one_line_error(err, f"cluster {cluster}")


def test_rank_in_the_config_is_checked_against_the_bases(tmp_path, adapter):
    edit_adapter_config(adapter, r=8)
    with pytest.raises(peft_jd.ShapeMismatchError, match="r=8 but bases .* rank 4"):
        export_adapter_to_lora(str(adapter))


def test_sigma_of_the_wrong_shape_is_a_shape_mismatch(tmp_path, adapter, capsys):
    tensors = load_file(adapter / ADAPTER_WEIGHTS_NAME)
    tensors[sorted(tensors)[0]] = torch.zeros(4, 4)  # full Σ in a diagonal adapter
    save_file(tensors, adapter / ADAPTER_WEIGHTS_NAME)
    with pytest.raises(peft_jd.ShapeMismatchError, match=r"shape \(4, 4\), expected \(4,\)"):
        export_adapter_to_lora(str(adapter))
    code, _, err = run(capsys, adapter, tmp_path / "out")
    assert code == 1
    assert_one_line_error(err, "expected (4,)")


def test_non_empty_foreign_output_is_kept_unless_overwrite(tmp_path, adapter, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, adapter, out)
    assert code == 2 and (out / "notes.txt").read_text() == "mine" and not (out / ADAPTER_WEIGHTS_NAME).exists()
    assert_one_line_error(err, "--overwrite")
    code, _, _ = run(capsys, adapter, out, "--overwrite")
    assert code == 0 and (out / ADAPTER_WEIGHTS_NAME).is_file() and not (out / "notes.txt").exists()


def test_previous_export_and_empty_folder_are_replaced(tmp_path, adapter, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert run(capsys, adapter, out)[0] == 0  # empty folder
    first = (out / ADAPTER_WEIGHTS_NAME).read_bytes()
    assert run(capsys, adapter, out)[0] == 0  # an earlier export-lora output, no --overwrite needed
    assert (out / ADAPTER_WEIGHTS_NAME).read_bytes() == first


def test_output_that_is_a_file_is_refused(tmp_path, adapter, capsys):
    out = tmp_path / "out"
    out.write_text("keep")
    code, _, err = run(capsys, adapter, out, "--overwrite")
    assert code == 2 and out.read_text() == "keep"
    assert_one_line_error(err, "not a folder")


@pytest.mark.parametrize("target", ["collection", "adapter", "bases", "adapters_folder"])
def test_peft_jd_sources_are_never_replaced_even_with_overwrite(tmp_path, adapter, capsys, target):
    root = tmp_path / "c"
    out = {
        "collection": root,
        "adapter": adapter,
        "bases": root / "bases",
        "adapters_folder": root / "adapters",  # holds the adapter being exported
    }[target]
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    code, _, err = run(capsys, adapter, out, "--overwrite")
    assert code == 2
    assert_one_line_error(err, "never replaces")
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_lora_export_api_refuses_a_foreign_folder(tmp_path, adapter):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(peft_jd.JDLoraError, match="overwrite"):
        export_adapter_to_lora(str(adapter)).save_pretrained(out)
    assert (out / "notes.txt").read_text() == "mine"
