"""Checks of one PEFT LoRA adapter before compression: its config (supported variants, JSON types) and the tensor
names and shapes in its weights file header (LoRA factors and the tensors of its `modules_to_save`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ..core import PEFT_KEY_PREFIX, AdapterFormatError, ShapeMismatchError


LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"
# LoRA variants whose saved factors are not a plain additive update of the original base weight.
_UNSUPPORTED_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class ModuleShape:
    """Shape of one LoRA module: `lora_A` is `(rank, in_features)`, `lora_B` is `(out_features, rank)`."""

    rank: int
    in_features: int
    out_features: int


def check_config(config: dict[str, Any], config_path: Path) -> None:
    """Raises `AdapterFormatError` naming `config_path` for a LoRA variant JD-LoRA cannot represent, or a field of
    the wrong type."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterFormatError(
            f"{config_path}: peft_type is {peft_type or 'missing'!r}; only LoRA adapters can be compressed."
        )
    problems = []
    if config.get("use_dora"):
        problems.append("DoRA (use_dora=True) has a magnitude vector that is not a low-rank update")
    if config.get("lora_bias"):
        problems.append("lora_bias=True adds a bias that is not a low-rank update")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out=True (Conv1D layers) is not supported by JD-LoRA (nn.Linear only)")
    if config.get("target_parameters"):
        problems.append("target_parameters (LoRA on raw parameters) is not supported")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_UNSUPPORTED_INITS):
        problems.append(f"init_lora_weights={init!r} changes the base weights; convert the adapter to a plain LoRA")
    if problems:
        raise AdapterFormatError(f"{config_path}: cannot compress this adapter: " + "; ".join(problems) + ".")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config[key], bool) or config[key] <= 0:
            raise AdapterFormatError(f"{config_path}: {key} is {config.get(key)!r}; expected a positive number.")
    _check_types(config, config_path)


# Optional config fields and the JSON types the compression relies on (anything else would fail later, unclearly).
_FIELD_TYPES = {
    "base_model_name_or_path": (str,),
    "task_type": (str,),
    "rank_pattern": (dict,),
    "alpha_pattern": (dict,),
    "target_modules": (list, str),
    "modules_to_save": (list,),
}


def _check_types(config: dict[str, Any], config_path: Path) -> None:
    for key, kinds in _FIELD_TYPES.items():
        value = config.get(key)
        if value is not None and not isinstance(value, kinds):
            expected = " or ".join("a list" if k is list else "an object" if k is dict else "a string" for k in kinds)
            raise AdapterFormatError(
                f"{config_path}: {key} is {value!r}; expected {expected} (or null). Fix the adapter's config."
            )
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern, value in (config.get(key) or {}).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise AdapterFormatError(f"{config_path}: {key}[{pattern!r}] is {value!r}; expected a positive "
                                         "number.")
    saved = config.get("modules_to_save") or []
    if not all(isinstance(name, str) and name for name in saved):
        raise AdapterFormatError(f"{config_path}: modules_to_save must list module names, got {saved!r}.")


def _is_saved_key(key: str, modules_to_save: list[str]) -> bool:
    """A tensor of a `modules_to_save` module: PEFT saves it as `base_model.model.<path>.<module>.<param>` (the same
    rule as `peft_jd.core.split_adapter_keys`, which reads it back from the sigma adapter)."""
    return any(f".{module}." in f".{key}" for module in modules_to_save)


def scan_modules(weights_path: Path, modules_to_save: list[str] | None = None
                 ) -> tuple[dict[str, ModuleShape], dict[str, list[int]]]:
    """LoRA module shapes and `modules_to_save` tensor shapes of an adapter file (header only)."""
    try:
        with safe_open(weights_path, framework="pt") as handle:
            header = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError for truncated or foreign files
        raise AdapterFormatError(f"{weights_path}: not a readable safetensors file ({exc}).") from exc
    shapes: dict[str, dict[str, list[int]]] = {}
    saved: dict[str, list[int]] = {}
    for key, shape in header.items():
        for suffix, which in ((LORA_A_SUFFIX, "A"), (LORA_B_SUFFIX, "B")):
            if key.startswith(PEFT_KEY_PREFIX) and key.endswith(suffix):
                shapes.setdefault(key[len(PEFT_KEY_PREFIX) : -len(suffix)], {})[which] = shape
                break
        else:
            if modules_to_save and _is_saved_key(key, modules_to_save):
                saved[key] = shape
                continue
            raise AdapterFormatError(
                f"{weights_path}: unexpected tensor {key!r}; only plain LoRA factors (lora_A/lora_B weights of "
                "linear layers) and the tensors of the config's modules_to_save can be compressed (no DoRA, "
                "LoRA on embeddings or biases)."
            )
    modules = {}
    for module_key, pair in sorted(shapes.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "B" not in pair else "lora_A"
            raise AdapterFormatError(f"{weights_path}: module {module_key} has no {missing} tensor.")
        if len(pair["A"]) != 2 or len(pair["B"]) != 2:
            raise AdapterFormatError(
                f"{weights_path}: module {module_key} has lora_A of shape {pair['A']} and lora_B of shape "
                f"{pair['B']}; LoRA factors of a linear layer are 2-D ((r, in_features) and (out_features, r)). "
                "This is not a LoRA of linear layers (a convolution or a corrupt file)."
            )
        (rank, in_features), (out_features, rank_b) = pair["A"], pair["B"]
        if rank == 0:
            raise AdapterFormatError(f"{weights_path}: module {module_key} has rank 0 (empty lora_A); retrain it.")
        if rank != rank_b:
            raise AdapterFormatError(
                f"{weights_path}: module {module_key} has lora_A rank {rank} but lora_B rank {rank_b}."
            )
        if rank > min(in_features, out_features):
            raise ShapeMismatchError(
                f"{weights_path}: module {module_key} has rank {rank} > min(in_features={in_features}, "
                f"out_features={out_features}); such a LoRA is not low-rank. Retrain it with a smaller r."
            )
        modules[module_key] = ModuleShape(rank=rank, in_features=in_features, out_features=out_features)
    if not modules:
        raise AdapterFormatError(f"{weights_path}: holds no LoRA tensors.")
    return modules, saved
