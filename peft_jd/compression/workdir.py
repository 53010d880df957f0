"""Resumable state of a compression run: one result file per finished module, next to the output folder.

The work folder `.<OUT name>.peft-jd-work/` sits beside `OUT`; it is keyed by a hash of the settings and of the input
files (path, size, mtime), so a rerun of the same command skips finished modules and any change starts afresh. The
output folder itself is only created, atomically, once every module is done. It is used only under the writers' lock
of `OUT`, so the next run also removes the temporary files a killed run left in it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..core import AdapterFormatError, atomic_write_bytes, atomic_write_json
from .lora_io import LoraAdapter
from .result import CompressionResult


logger = logging.getLogger(__name__)
STATE_NAME = "state.json"


def work_dir_for(out_dir: str | os.PathLike) -> Path:
    out_dir = Path(out_dir).absolute()
    return out_dir.parent / f".{out_dir.name}.peft-jd-work"


def inputs_fingerprint(adapters: list[LoraAdapter]) -> list[list[Any]]:
    """Identity of the inputs: name, weights path, size and modification time of every adapter file."""
    rows = []
    for adapter in adapters:
        stat = adapter.weights_path.stat()
        rows.append([adapter.name, str(adapter.weights_path.resolve()), stat.st_size, stat.st_mtime_ns])
    return rows


def _file_name(index: int, module_key: str) -> str:
    return f"{index:05d}-{re.sub(r'[^A-Za-z0-9._-]', '_', module_key)}.safetensors"


class WorkDir:
    """Finished modules of one run.

    Args:
        out_dir: The final output folder.
        key_data: Settings and input identity; the state is reused only if they are identical.
        resume: Reuse matching state (otherwise always start afresh).
    """

    def __init__(self, out_dir: str | os.PathLike, key_data: dict[str, Any], resume: bool = True):
        self.path = work_dir_for(out_dir)
        self.key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()
        state_path = self.path / STATE_NAME
        if self.path.exists():
            previous = None
            if state_path.is_file():
                try:
                    state = json.loads(state_path.read_text(encoding="utf-8"))
                    previous = state.get("key") if isinstance(state, dict) else None
                except ValueError:  # not UTF-8 or not JSON: a state this version did not write
                    previous = None
            if resume and previous == self.key:
                logger.info("resuming from %s (%d modules done)", self.path, len(self._finished()))
            else:
                if previous is not None:
                    logger.warning("discarding earlier partial run in %s (other settings or inputs)", self.path)
                shutil.rmtree(self.path)
        (self.path / "modules").mkdir(parents=True, exist_ok=True)
        for leftover in (self.path / "modules").glob(".tmp-*"):  # a module write killed half-way
            leftover.unlink(missing_ok=True)
        if not state_path.is_file():
            atomic_write_json(state_path, json.loads(json.dumps({"key": self.key, "settings": key_data}, default=str)))

    def _finished(self) -> list[Path]:
        return sorted(p for p in (self.path / "modules").glob("*.safetensors") if not p.name.startswith("."))

    def module_path(self, index: int, module_key: str) -> Path:
        return self.path / "modules" / _file_name(index, module_key)

    def done(self, index: int, module_key: str) -> bool:
        return self.module_path(index, module_key).is_file()

    def save(self, index: int, module_key: str, result: CompressionResult, info: dict[str, Any]) -> None:
        """Stores one module's result atomically (temporary file + rename)."""
        tensors = {
            "U": result.U,
            "V": result.V,
            "sigma": result.sigma.float(),
            "cluster": result.cluster.long(),
            "err2": result.err2.double(),
        }
        self.save_tensors(index, module_key, tensors, info)

    def save_tensors(self, index: int, module_key: str, tensors: dict[str, torch.Tensor], info: dict[str, Any]
                     ) -> None:
        """Stores any named tensors of one module atomically (budgeted runs keep their nested solutions)."""
        metadata = {"module_key": module_key, "info": json.dumps(info)}
        contiguous = {name: tensor.contiguous() for name, tensor in tensors.items()}
        atomic_write_bytes(self.module_path(index, module_key), save(contiguous, metadata=metadata))

    def load(self, index: int, module_key: str, names: tuple[str, ...] = ("U", "V", "sigma", "cluster", "err2")
             ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Reads back the requested tensors and the info dict of one module."""
        with safe_open(self.module_path(index, module_key), framework="pt") as handle:
            metadata = handle.metadata()
            if metadata.get("module_key") != module_key:
                raise AdapterFormatError(f"{self.module_path(index, module_key)} holds "
                                         f"{metadata.get('module_key')!r}; rerun with --no-resume.")
            tensors = {name: handle.get_tensor(name) for name in names if name in handle.keys()}
        return tensors, json.loads(metadata["info"])

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
