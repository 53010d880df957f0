"""Helpers of the compression, collection safety and crash tests: PEFT LoRA folders (saved by PEFT from the tiny
model, or synthetic ones written straight to files, no model needed), dense references computed from the files
(independent of peft_jd), a report for hand-made collections, and a collection's consistency read from its files."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from utils import TARGETS, TINY_NAME, tiny_llama

from peft_jd.compression.report import CompressionReport, adapter_entry


# module key → (in_features, out_features); two target suffixes, as PEFT names LoRA tensors.
MODULES = {
    "model.layers.0.self_attn.q_proj": (16, 16),
    "model.layers.0.self_attn.v_proj": (16, 8),
    "model.layers.1.self_attn.q_proj": (16, 16),
    "model.layers.1.self_attn.v_proj": (16, 8),
}
BASE_MODEL = "org/tiny-base"


def write_lora(path: Path, seed: int, r: int = 2, alpha: float = 4.0, modules_to_save: dict | None = None,
               **config) -> Path:
    """A PEFT LoRA folder with random factors, as `save_pretrained` writes it.

    Args:
        modules_to_save: Module name → `{param: tensor}` stored as `base_model.model.<name>.<param>`.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, (d_in, d_out) in MODULES.items():
        tensors[f"base_model.model.{key}.lora_A.weight"] = torch.randn(r, d_in, generator=gen) / math.sqrt(d_in)
        tensors[f"base_model.model.{key}.lora_B.weight"] = torch.randn(d_out, r, generator=gen)
    for name, params in (modules_to_save or {}).items():
        for param, tensor in params.items():
            tensors[f"base_model.model.{name}.{param}"] = tensor
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    data = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"],
            "base_model_name_or_path": BASE_MODEL, "task_type": "CAUSAL_LM",
            "modules_to_save": sorted(modules_to_save) if modules_to_save else None, **config}
    (path / "adapter_config.json").write_text(json.dumps(data))
    return path


def make_lora(path: Path, r: int = 4, alpha: float = 8, seed: int = 0, base: str = TINY_NAME,
              targets=TARGETS, **config) -> Path:
    """A PEFT LoRA of the tiny model with random (trained-like, non-zero) lora_B, saved with `save_pretrained`."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **config))
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for linear in module.lora_B.values():
                linear.weight.data = 0.2 * torch.randn(linear.weight.shape, generator=gen)
    model.save_pretrained(path)
    config_path = path / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["base_model_name_or_path"] = base  # config-built models have no name; a Hub model would
    config_path.write_text(json.dumps(data))
    return path


def lora_delta(path: Path, module_key: str) -> torch.Tensor:
    """Dense ΔW of a saved LoRA module, from its files and PEFT's scaling rules (independent of peft_jd)."""
    config = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    prefix = f"base_model.model.{module_key}"
    lora_a, lora_b = tensors[f"{prefix}.lora_A.weight"].double(), tensors[f"{prefix}.lora_B.weight"].double()
    rank = lora_a.shape[0]
    alpha = next((v for k, v in (config.get("alpha_pattern") or {}).items() if module_key.endswith(k)),
                 config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return scale * lora_b @ lora_a


def sigma_delta(collection: Path, name: str, module_key: str) -> torch.Tensor:
    """Dense ΔŴ = scaling · U[c] Σ V[c]ᵀ of a sigma adapter, from its files."""
    bases = load_file(str(collection / "bases" / "jd_bases.safetensors"))
    config = json.loads((collection / "adapters" / name / "adapter_config.json").read_text())
    sigma = load_file(str(collection / "adapters" / name / "adapter_model.safetensors"))[
        f"base_model.model.{module_key}.jd_sigma"].double()
    cluster = config["cluster"] if isinstance(config["cluster"], int) else config["cluster"][module_key]
    sigma = sigma if sigma.dim() == 2 else torch.diag(sigma)
    U, V = bases[f"{module_key}.U"][cluster].double(), bases[f"{module_key}.V"][cluster].double()
    return config["scaling"] * U @ sigma @ V.T


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_consistent(collection: Path, sources: dict[str, Path]) -> set[str]:
    """Asserts that a collection's report, bases and sigma adapters belong together, and that every adapter's Σ
    reproduces the error the report records for its source LoRA; returns the adapter names."""
    report = json.loads((collection / "report.json").read_text())
    fingerprint = sha256(collection / "bases" / "jd_bases.safetensors")
    assert report["bases_fingerprint"] == fingerprint
    names = {p.name for p in (collection / "adapters").iterdir() if not p.name.startswith(".")}
    assert names == set(report["adapters"])
    for name in names:
        config = json.loads((collection / "adapters" / name / "adapter_config.json").read_text())
        assert config["bases_fingerprint"] == fingerprint
        for module_key, err2 in report["adapters"][name]["err2"].items():
            delta = lora_delta(sources[name], module_key)
            actual = float((delta - sigma_delta(collection, name, module_key)).norm() ** 2 / delta.norm() ** 2)
            assert abs(actual - err2) <= 1e-4 + 1e-3 * err2, (name, module_key, actual, err2)
    return names


_VOLATILE = {"seconds", "timings", "seconds_read", "seconds_compress"}


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def snapshot(collection: Path) -> dict[str, object] | None:
    """Every file of a collection (bytes; JSON without its timings), or `None` when there is none to load."""
    if not (collection / "report.json").is_file():
        return None
    state: dict[str, object] = {}
    for path in sorted(collection.rglob("*")):
        if path.is_file():
            relative = str(path.relative_to(collection))
            state[relative] = _stable(json.loads(path.read_text())) if path.suffix == ".json" else path.read_bytes()
    return state


def write_report(root: Path, err2: dict[str, float], added: tuple[str, ...] = ()) -> None:
    """A `report.json` for a collection written by hand (e.g. `utils.make_collection`): every module of adapter
    `name` gets the squared relative error `err2[name]`; modules, clusters and sizes are read from the files."""
    bases = json.loads((root / "bases" / "jd_bases_config.json").read_text())
    r, diagonal = bases["r"], bases["sigma_type"] == "diag"
    modules = {key: {"in_features": m["in_features"], "out_features": m["out_features"],
                     "num_clusters": m["num_clusters"], "mean_err2": sum(err2.values()) / len(err2)}
               for key, m in bases["modules"].items()}
    entries = {}
    for name, value in err2.items():
        cluster = json.loads((root / "adapters" / name / "adapter_config.json").read_text())["cluster"]
        clusters = {key: cluster if isinstance(cluster, int) else cluster[key] for key in modules}
        lora_params = sum(r * (m["in_features"] + m["out_features"]) for m in modules.values())
        entries[name] = adapter_entry(name, {key: value for key in modules}, clusters, lora_params,
                                      (r if diagonal else r * r) * len(modules), added=name in added)
    bases_params = sum(m["num_clusters"] * r * (m["in_features"] + m["out_features"]) for m in modules.values())
    settings = {"method": bases.get("method", "jd-full"), "rank": r, "clusters": bases["num_clusters"],
                "normalize": True, "seed": 0}
    report = CompressionReport.build(settings, bases["base_model_name_or_path"], bases["target_modules"], "CAUSAL_LM",
                                     modules, entries, bases_params, r if diagonal else r * r)
    report.data["bases_fingerprint"] = bases["fingerprint"]
    report.save(root / "report.json")
