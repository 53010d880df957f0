"""Cache of the base and LoRA evaluations of a fidelity run (≈ 11 min at 40 tasks), reused by `--resume`.

The compressed rows of a run change with the method; the two reference evaluations do not. They are stored under
the zoo cache, keyed by everything that decides their predictions: the model, the tasks, the test split, the
training settings, the generation batch size, the library versions and the bytes of every LoRA's weights (a
retrained LoRA misses the cache).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

from peft_jd.core import atomic_write_text
from peft_jd.zoo import EvalResult


REFERENCE_DIR = "fidelity-reference"


def reference_key(key: dict, loras: dict[str, Path], batch_size: int) -> str:
    """Digest of the run's checkpoint `key`, `batch_size`, the torch/transformers versions and the LoRA weights."""
    digest = hashlib.sha256()
    digest.update(json.dumps(key, sort_keys=True, default=str).encode())
    digest.update(f"{batch_size}|{torch.__version__}|{transformers.__version__}".encode())
    for name in sorted(loras):
        digest.update(name.encode())
        for path in sorted(Path(loras[name]).glob("*.safetensors")):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


def load_reference(cache_dir: Path, digest: str) -> tuple[EvalResult, EvalResult, dict[str, float]] | None:
    """The cached `(base, lora, teacher_forced)` evaluations for `digest`, or `None`."""
    path = cache_dir / REFERENCE_DIR / f"{digest}.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    return EvalResult(**saved["base"]), EvalResult(**saved["lora"]), saved["teacher_forced"]


def save_reference(
    cache_dir: Path, digest: str, base: EvalResult, lora: EvalResult, teacher_forced: dict[str, float]
) -> Path:
    """Stores the reference evaluations for `digest` (atomically: a crash leaves no half-written entry)."""
    path = cache_dir / REFERENCE_DIR / f"{digest}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"base": asdict(base), "lora": asdict(lora), "teacher_forced": teacher_forced}
    atomic_write_text(path, json.dumps(payload))
    return path
