"""`peft-jd export-lora`: the written LoRA reproduces the JD adapter's forward through PEFT's own LoRA."""

from __future__ import annotations

import torch
from peft import PeftModel
from utils import make_collection, tiny_llama

from peft_jd.cli import main


def test_export_lora_command_writes_an_exact_peft_lora(tmp_path, capsys):
    make_collection(tmp_path / "c", tiny_llama(), n_adapters=1, r=4, clusters=2, sigma_type="diag")
    adapter = tmp_path / "c" / "adapters" / "task-0"
    assert main(["export-lora", str(adapter), str(tmp_path / "lora")]) == 0
    assert "wrote PEFT LoRA (r=4" in capsys.readouterr().out
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        jd = PeftModel.from_pretrained(tiny_llama(), str(adapter))(input_ids=ids).logits
        lora = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lora"))(input_ids=ids).logits
    torch.testing.assert_close(lora, jd, atol=1e-5, rtol=1e-5)


def test_export_lora_command_reports_missing_adapter(tmp_path, capsys):
    assert main(["export-lora", str(tmp_path / "nope"), str(tmp_path / "out")]) == 1
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
