"""On-disk format of a JD-LoRA collection: the shared bases directory and the per-adapter sigma directories.

See `docs/format.md` for the full specification. In short:

* bases directory: `jd_bases_config.json` + `jd_bases.safetensors` holding, per target module key `M` (the module's
  name inside the base transformers model, e.g. `model.layers.0.self_attn.q_proj`), `M.U` of shape
  `(num_clusters, out_features, r)` and `M.V` of shape `(num_clusters, in_features, r)`;
* sigma adapter directory: a PEFT adapter (`adapter_config.json` with `peft_type: "JDLORA"`,
  `adapter_model.safetensors`) whose tensors are `base_model.model.M.jd_sigma`, `(r, r)` for full Σ or `(r,)` for
  diagonal Σ. The adapter's update of module `M` is `ΔW = scaling · U[c] Σ V[c]ᵀ` with `c` its cluster for `M`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .errors import AdapterFormatError
from .io import atomic_directory, atomic_write_json, read_json_object
from .layout import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    BASES_CONFIG_NAME,
    BASES_WEIGHTS_NAME,
    CARD_NAME,
    PEFT_KEY_PREFIX,
    SIGMA_KEY_SUFFIX,
    sigma_state_dict_key,
)


FORMAT_VERSION = 2
# Collections whose modules all have the config's rank are written as version 1, readable by older peft-jd.
UNIFORM_RANK_VERSION = 1


@dataclass
class ModuleBasesSpec:
    """Shapes of one module's bases.

    Args:
        in_features: Input size of the module.
        out_features: Output size of the module.
        num_clusters: Number of (U, V) pairs of the module.
        r: Rank of this module's bases when it differs from the collection's `r` (budgeted compression allocates
            ranks per module); `None` means the collection's `r`.
    """

    in_features: int
    out_features: int
    num_clusters: int
    r: int | None = None


@dataclass
class BasesConfig:
    """Content of `jd_bases_config.json`.

    Args:
        r: Rank k of U and V; with per-module ranks (`modules[key].r`), the largest of them.
        sigma_type: `"full"` (k×k Σ per adapter) or `"diag"` (k-vector Σ per adapter).
        num_clusters: Largest number of clusters of any module.
        base_model_name_or_path: Base model the LoRAs were trained on.
        target_modules: Module suffixes the collection adapts (e.g. `["q_proj", "v_proj"]`).
        modules: Per module key, its shapes.
        fingerprint: sha256 of `jd_bases.safetensors`; every sigma adapter records it to detect other bases.
        method: Compression method that produced the bases.
        metadata: Free-form extra information (compression settings, timings).
    """

    r: int
    sigma_type: str
    num_clusters: int
    base_model_name_or_path: str | None
    target_modules: list[str]
    modules: dict[str, ModuleBasesSpec]
    fingerprint: str = ""
    method: str = "jd-full"
    format_version: int = UNIFORM_RANK_VERSION
    metadata: dict[str, Any] = field(default_factory=dict)

    def rank_of(self, module_key: str) -> int:
        """Rank of the bases of `module_key` (its own rank, or the collection's `r`)."""
        module = self.modules.get(module_key)
        return self.r if module is None or module.r is None else module.r

    def has_module_ranks(self) -> bool:
        """True when some module's rank differs from `r` (a budgeted collection)."""
        return any(m.r is not None and m.r != self.r for m in self.modules.values())

    def rank_pattern(self) -> dict[str, int]:
        """Module key → rank for the modules whose rank differs from `r` (PEFT's `rank_pattern` convention)."""
        return {key: m.r for key, m in self.modules.items() if m.r is not None and m.r != self.r}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for module in out["modules"].values():
            if module["r"] is None or module["r"] == self.r:
                del module["r"]
        out["format"] = "peft-jd-bases"
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> BasesConfig:
        if not isinstance(data, Mapping):
            raise AdapterFormatError(f"{source}: a bases config must be a JSON object, not {type(data).__name__}.")
        data = dict(data)
        data.pop("format", None)
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise AdapterFormatError(
                f"{source}: bases format version {version} is newer than this peft-jd understands ({FORMAT_VERSION}). "
                "Upgrade peft-jd."
            )
        try:
            data["modules"] = {k: ModuleBasesSpec(**v) for k, v in data["modules"].items()}
            return cls(**data)
        except (KeyError, TypeError, AttributeError) as exc:
            raise AdapterFormatError(f"{source}: malformed bases config ({exc}).") from exc

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BasesConfig:
        return cls.from_dict(read_json_object(path, "bases config"), source=str(path))


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """sha256 hex digest of a file (the same digest the Hub uses as LFS oid)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raises `AdapterFormatError` naming `what` if `tensor` holds NaN or inf."""
    if not torch.isfinite(tensor).all():
        raise AdapterFormatError(f"{what} contains NaN or inf values; the file is corrupt or training diverged.")


def write_bases(
    out_dir: str | os.PathLike,
    bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    config: BasesConfig,
    readme: str | None = None,
) -> BasesConfig:
    """Writes a bases directory atomically and returns its config with the fingerprint filled in.

    Args:
        out_dir: Target directory (replaced atomically if it exists).
        bases: Per module key, `(U, V)` with shapes `(c, out_features, r)` and `(c, in_features, r)`.
        config: Bases config; `modules` is (re)filled from the tensors, `fingerprint` computed here.
        readme: Optional model card text written as `README.md`.
    """
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, ModuleBasesSpec] = {}
    for module_key, (U, V) in bases.items():
        if U.dim() == 2:
            U, V = U.unsqueeze(0), V.unsqueeze(0)
        if U.shape[0] != V.shape[0] or U.shape[-1] != V.shape[-1] or not 0 < U.shape[-1] <= config.r:
            raise ValueError(
                f"bases of {module_key}: U {tuple(U.shape)} and V {tuple(V.shape)} disagree (each module's rank must "
                f"be the same in U and V and at most r={config.r})"
            )
        check_finite(U, f"bases U of module {module_key}")
        check_finite(V, f"bases V of module {module_key}")
        tensors[f"{module_key}.U"] = U.detach().to("cpu").contiguous()
        tensors[f"{module_key}.V"] = V.detach().to("cpu").contiguous()
        rank = U.shape[-1] if U.shape[-1] != config.r else None
        modules[module_key] = ModuleBasesSpec(in_features=V.shape[1], out_features=U.shape[1],
                                              num_clusters=U.shape[0], r=rank)
    config.modules = modules
    config.num_clusters = max((m.num_clusters for m in modules.values()), default=1)
    config.format_version = FORMAT_VERSION if config.has_module_ranks() else UNIFORM_RANK_VERSION
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, tmp / BASES_WEIGHTS_NAME, metadata={"format": "peft-jd-bases"})
        config.fingerprint = file_sha256(tmp / BASES_WEIGHTS_NAME)
        atomic_write_json(tmp / BASES_CONFIG_NAME, config.to_dict())
        if readme is not None:
            (tmp / CARD_NAME).write_text(readme, encoding="utf-8")
    return config


def looks_like_local_path(name: str) -> bool:
    """True for a model name that cannot be a Hub id (`name` or `org/name`): a path-like start, several `/`, a `\\`,
    or a file or folder that exists."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or os.path.exists(name)


def adapter_config_dict(config: Any) -> dict[str, Any]:
    """A PEFT adapter config (`PeftConfig` or mapping) as JSON-ready data: sets sorted, enums as their value."""
    data = dict(config) if isinstance(config, Mapping) else config.to_dict()
    for key, value in list(data.items()):
        if isinstance(value, (set, frozenset)):
            data[key] = sorted(value)
        elif hasattr(value, "value") and isinstance(value.value, str):
            data[key] = value.value
    return data


def write_adapter_config(directory: str | os.PathLike, config: Any) -> None:
    """Writes `adapter_config.json` reproducibly (PEFT writes `target_modules` from a set, in arbitrary order)."""
    atomic_write_json(Path(directory) / ADAPTER_CONFIG_NAME, adapter_config_dict(config))


def module_key_from_sigma_key(key: str) -> str:
    if not (key.startswith(PEFT_KEY_PREFIX) and key.endswith(SIGMA_KEY_SUFFIX)):
        raise AdapterFormatError(f"unexpected tensor {key!r} in a JD-LoRA adapter file")
    return key[len(PEFT_KEY_PREFIX) : -len(SIGMA_KEY_SUFFIX)]


def write_sigma_adapter(
    out_dir: str | os.PathLike,
    sigmas: Mapping[str, torch.Tensor],
    config: Any,
    readme: str | None = None,
    saved_tensors: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Writes a PEFT-loadable sigma adapter directory atomically.

    Args:
        out_dir: Target directory.
        sigmas: Per module key, Σ of shape `(r, r)` (full) or `(r,)` (diag).
        config: The adapter's `JDLoraConfig` (or its dict).
        readme: Optional model card text written as `README.md`.
        saved_tensors: Tensors of the config's `modules_to_save`, by their PEFT file key, stored as they are.
        dtype: Storage dtype of Σ (float32, or float16/bfloat16 to halve the adapter's bytes).
    """
    tensors = {}
    for module_key, sigma in sigmas.items():
        check_finite(sigma, f"Σ of module {module_key} (adapter {out_dir})")
        stored = sigma.detach().to("cpu", dtype).contiguous()
        check_finite(stored, f"Σ of module {module_key} stored as {dtype} (adapter {out_dir}; it overflows the dtype)")
        tensors[sigma_state_dict_key(module_key)] = stored
    for key, tensor in (saved_tensors or {}).items():
        if key in tensors:
            raise AdapterFormatError(f"adapter {out_dir}: modules_to_save tensor {key!r} clashes with a Σ key.")
        check_finite(tensor, f"modules_to_save tensor {key} (adapter {out_dir})")
        tensors[key] = tensor.detach().to("cpu").contiguous()
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, tmp / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
        write_adapter_config(tmp, config)
        if readme is not None:
            (tmp / CARD_NAME).write_text(readme, encoding="utf-8")
