"""Building, loading and measuring adapter collections for the zoo: PEFT LoRAs, per-adapter SVD, JD-LoRA.

Reconstruction errors and parameter counts are computed here from the files on disk (LoRA factors, bases and Σ),
independently of the compression code that wrote them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file

from ..bulk import load_adapters
from ..compression import compress
from ..core import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    BASES_WEIGHTS_NAME,
    PEFT_KEY_PREFIX,
    atomic_directory,
    bases_dir,
    module_key_from_sigma_key,
)
from ..core import adapter_dir as sigma_adapter_dir  # the functions below call their LoRA folders `adapter_dir`
from .model import ZooModel


_LORA_A = ".lora_A.weight"
_LORA_B = ".lora_B.weight"


def load_lora_collection(zoo: ZooModel, adapters: Mapping[str, Path]) -> PeftModel:
    """Wraps `zoo.model` with every LoRA of `adapters` (name → directory) loaded, for mixed-batch generation."""
    names = list(adapters)
    if not names:
        raise ValueError("load_lora_collection needs at least one adapter.")
    model = PeftModel.from_pretrained(zoo.model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    return model.eval()


def load_jd_collection(zoo: ZooModel, collection_dir: Path, names: Sequence[str], progress: bool = True) -> PeftModel:
    """Wraps `zoo.model` with the JD-LoRA sigma adapters `collection_dir/adapters/<name>` (shared bases once)."""
    adapter_dirs = [sigma_adapter_dir(collection_dir, name) for name in names]
    for name, directory in zip(names, adapter_dirs):
        if not (directory / ADAPTER_CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"compressed collection {collection_dir} has no adapter {name!r} ({directory} is missing); "
                "re-run the compression with that adapter."
            )
    model = PeftModel.from_pretrained(zoo.model, str(adapter_dirs[0]), adapter_name=names[0])
    if len(names) > 1:
        load_adapters(
            model, [str(d) for d in adapter_dirs[1:]], adapter_names=list(names[1:]), progress=progress
        )
    return model.eval()


def release(zoo: ZooModel, model: PeftModel) -> None:
    """Removes every adapter layer so that `zoo.model` is the plain base model again."""
    zoo.model = model.unload()


def compress_collection(
    adapters: Mapping[str, Path], out_dir: Path, method: str, rank: int, clusters: int = 1, **options
) -> dict:
    """Compresses LoRAs (name → directory) into `out_dir` with `peft_jd.compression.compress`; returns its report.

    Adapters are passed as `NAME=DIR` specs so that the sigma adapters are named after the tasks.

    Args:
        adapters: Name → PEFT LoRA directory.
        out_dir: Output collection folder (`bases/`, `adapters/<name>/`, `report.json`).
        method: `"jd-full"`, `"jd-diag"` or `"svd"`.
        rank: Rank of the bases.
        clusters: Clusters per module.
        options: Further keyword arguments of `compress` (`normalize`, `seed`, `progress`, …).
    """
    specs = [f"{name}={Path(path).resolve()}" for name, path in adapters.items()]
    return dict(compress(specs, out_dir, method=method, rank=rank, clusters=clusters, **options).data)


def lora_factors(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per module key, `(B, A, scaling)` of a PEFT LoRA directory, so that `ΔW = scaling · B A`."""
    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG_NAME).read_text())
    r, alpha = config["r"], config.get("lora_alpha", config["r"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS_NAME))
    factors = {}
    for key, lora_a in tensors.items():
        if not key.endswith(_LORA_A):
            continue
        stem = key[: -len(_LORA_A)]
        module_key = stem[len(PEFT_KEY_PREFIX) :] if stem.startswith(PEFT_KEY_PREFIX) else stem
        factors[module_key] = (tensors[stem + _LORA_B], lora_a, scaling)
    if not factors:
        raise ValueError(f"{adapter_dir}: no LoRA factors found in {ADAPTER_WEIGHTS_NAME}.")
    return factors


def truncate_lora(adapter_dir: Path, out_dir: Path, rank: int) -> Path:
    """Per-adapter SVD baseline: writes the best rank-`rank` approximation of every module's ΔW as a PEFT LoRA.

    Computed in factored form (QR of both factors, SVD of the small core), never forming ΔW.
    """
    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG_NAME).read_text())
    tensors = {}
    for module_key, (lora_b, lora_a, scaling) in lora_factors(adapter_dir).items():
        q_b, r_b = torch.linalg.qr(lora_b.double())
        q_a, r_a = torch.linalg.qr(lora_a.double().T)
        u, s, vh = torch.linalg.svd(scaling * r_b @ r_a.T)
        k = min(rank, s.numel())
        prefix = f"{PEFT_KEY_PREFIX}{module_key}"
        tensors[prefix + _LORA_B] = (q_b @ u[:, :k] * s[:k]).float().contiguous()
        tensors[prefix + _LORA_A] = (q_a @ vh[:k].T).T.float().contiguous()
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=config["target_modules"],
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=config.get("base_model_name_or_path"),
        inference_mode=True,
    )
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        lora_config.save_pretrained(str(tmp))
    return Path(out_dir)


def _jd_deltas(collection_dir: Path, name: str, bases: dict[str, torch.Tensor]):
    folder = sigma_adapter_dir(collection_dir, name)
    config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    scaling, cluster = config.get("scaling", 1.0), config.get("cluster", 0)
    for key, sigma in load_file(str(folder / ADAPTER_WEIGHTS_NAME)).items():
        module_key = module_key_from_sigma_key(key)
        c = cluster if isinstance(cluster, int) else cluster[module_key]
        U, V = bases[f"{module_key}.U"][c].double(), bases[f"{module_key}.V"][c].double()
        sigma = sigma.double() if sigma.dim() == 2 else torch.diag(sigma.double())
        yield module_key, scaling * U @ sigma @ V.T


def _mean_squared_relative_error(loras: Mapping[str, Path], approximations) -> dict[str, float]:
    errors = {}
    for name, lora_dir in loras.items():
        per_module, seen = [], set()
        factors = lora_factors(lora_dir)
        for module_key, approx in approximations(name):
            lora_b, lora_a, scaling = factors[module_key]
            exact = scaling * lora_b.double() @ lora_a.double()
            per_module.append(float(((exact - approx).norm() / exact.norm().clamp_min(1e-30)) ** 2))
            seen.add(module_key)
        # A module missing from the approximation is reconstructed as zero: relative error 1.
        per_module.extend(1.0 for key in factors if key not in seen)
        errors[name] = sum(per_module) / len(per_module)
    return errors


def reconstruction_errors(loras: Mapping[str, Path], collection_dir: Path) -> dict[str, float]:
    """Per adapter, the mean over modules of `(‖ΔW − ΔŴ‖_F / ‖ΔW‖_F)²` (the paper's measure) for a JD collection.

    Args:
        loras: Name → original PEFT LoRA directory.
        collection_dir: Compressed collection with `bases/` and `adapters/<name>/`.
    """
    bases = load_file(str(bases_dir(collection_dir) / BASES_WEIGHTS_NAME))
    return _mean_squared_relative_error(loras, lambda name: _jd_deltas(collection_dir, name, bases))


def lora_reconstruction_errors(loras: Mapping[str, Path], approximations: Mapping[str, Path]) -> dict[str, float]:
    """Like `reconstruction_errors`, for approximations stored as PEFT LoRAs (e.g. `truncate_lora` outputs)."""

    def deltas(name: str):
        for module_key, (lora_b, lora_a, scaling) in lora_factors(approximations[name]).items():
            yield module_key, scaling * lora_b.double() @ lora_a.double()

    return _mean_squared_relative_error(loras, deltas)


def lora_parameters(adapter_dir: Path) -> int:
    """Number of parameters of a PEFT LoRA (both factors, all modules)."""
    return sum(b.numel() + a.numel() for b, a, _ in lora_factors(adapter_dir).values())


def jd_parameters(collection_dir: Path, names: Sequence[str]) -> dict[str, float]:
    """Parameters per adapter of a JD collection: its Σ, the shared bases, and Σ + bases amortized over `names`."""
    bases = load_file(str(bases_dir(collection_dir) / BASES_WEIGHTS_NAME))
    bases_total = sum(t.numel() for t in bases.values())
    sigma_total = 0
    for name in names:
        sigmas = load_file(str(sigma_adapter_dir(collection_dir, name) / ADAPTER_WEIGHTS_NAME))
        sigma_total += sum(t.numel() for t in sigmas.values())
    sigma_mean = sigma_total / max(1, len(names))
    return {"sigma": sigma_mean, "bases": bases_total, "amortized": sigma_mean + bases_total / max(1, len(names))}
