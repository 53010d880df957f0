"""Reading standard PEFT LoRA adapters lazily: one (layer, module) at a time, from `adapter_model.safetensors`.

An adapter is given as a local directory, a Hub repo id (`owner/name`, optionally `owner/name/sub/folder` and
`@revision`), optionally prefixed by `NAME=` to choose its name in the collection. A plain text file lists such
specs, one per line (`#` starts a comment).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft.utils.other import get_pattern_key
from safetensors import safe_open

from ..core import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_KEY_PREFIX,
    AdapterFormatError,
    BaseModelMismatchError,
    ShapeMismatchError,
    UsageError,
    check_path_component,
    hub_download,
    looks_like_local_path,
    read_json_object,
    warn_once,
)
from .lora_checks import LORA_A_SUFFIX, LORA_B_SUFFIX, ModuleShape, check_config, scan_modules


_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class HubOptions:
    """How Hub adapters are fetched (passed to `huggingface_hub.hf_hub_download`).

    Args:
        revision: Default revision for specs without `@revision`.
        token: Hub token (`None`: the logged-in token, if any).
        cache_dir: Hub cache directory.
        local_files_only: Never touch the network; use the cache only.
    """

    revision: str | None = None
    token: str | bool | None = None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter, resolved to local files, with its header scanned (no tensor data read yet).

    Args:
        name: Name of the adapter in the collection (its sigma adapter folder name).
        source: The spec the user gave.
        weights_path: Local path of `adapter_model.safetensors`.
        config: Content of `adapter_config.json`.
        modules: Per module key, the LoRA shapes.
        revision: Hub revision the files were fetched at (`None` for local adapters).
        saved: Shapes of the tensors of its `modules_to_save` (classification heads, embeddings), by file key;
            they are carried over uncompressed into the sigma adapter.
    """

    name: str
    source: str
    weights_path: Path
    config: dict[str, Any]
    modules: dict[str, ModuleShape] = field(default_factory=dict)
    revision: str | None = None
    saved: dict[str, list[int]] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def task_type(self) -> str | None:
        return self.config.get("task_type")

    def scaling(self, module_key: str) -> float:
        """PEFT's scaling of `module_key`: `lora_alpha / r`, or `lora_alpha / sqrt(r)` for rsLoRA, with patterns."""
        rank_pattern = self.config.get("rank_pattern") or {}
        alpha_pattern = self.config.get("alpha_pattern") or {}
        rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module_key), self.config["r"])
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module_key), self.config["lora_alpha"])
        if rank != self.modules[module_key].rank:
            raise AdapterFormatError(
                f"{self.weights_path}: module {module_key} has lora_A with {self.modules[module_key].rank} rows but "
                f"adapter_config.json says r={rank}; the config does not belong to these weights."
            )
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    @property
    def modules_to_save(self) -> list[str] | None:
        return sorted(self.config["modules_to_save"]) if self.config.get("modules_to_save") else None

    def lora_params(self) -> int:
        """Number of LoRA parameters (all modules)."""
        return sum(m.rank * (m.in_features + m.out_features) for m in self.modules.values())

    def saved_params(self) -> int:
        """Number of `modules_to_save` parameters (stored uncompressed)."""
        return sum(math.prod(shape) for shape in self.saved.values())

    def read_saved_tensors(self) -> dict[str, torch.Tensor]:
        """The `modules_to_save` tensors, by their PEFT file key, as stored."""
        if not self.saved:
            return {}
        with safe_open(self.weights_path, framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in self.saved}

    def read_module(self, module_key: str, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Reads `(lora_A, lora_B)` of one module in their stored dtype; scaling is *not* applied.

        Args:
            module_key: The module.
            check: Raise `AdapterFormatError` naming the file if a tensor holds NaN or inf.
        """
        prefix = f"{PEFT_KEY_PREFIX}{module_key}"
        try:
            with safe_open(self.weights_path, framework="pt") as handle:
                lora_a = handle.get_tensor(prefix + LORA_A_SUFFIX)
                lora_b = handle.get_tensor(prefix + LORA_B_SUFFIX)
        except FileNotFoundError:
            raise AdapterFormatError(
                f"adapter {self.name!r}: {self.weights_path} disappeared while compressing; restore it and rerun "
                "(finished modules are resumed)."
            ) from None
        if check:
            for tensor, which in ((lora_a, "lora_A"), (lora_b, "lora_B")):
                if not torch.isfinite(tensor).all():
                    raise self.non_finite_error(module_key, which)
        return lora_a, lora_b

    def non_finite_error(self, module_key: str, which: str = "lora_A or lora_B") -> AdapterFormatError:
        return AdapterFormatError(
            f"{self.weights_path}: {which} of module {module_key} contains NaN or inf values; the file is corrupt or "
            "training diverged. Remove this adapter from the collection or retrain it."
        )


# ------------------------------------------------------------------------------------------------ spec parsing
def expand_specs(specs: Iterable[str | os.PathLike]) -> list[str]:
    """Expands list files (plain text, one spec per line) into specs; directories and Hub ids pass through."""
    expanded: list[str] = []
    for spec in specs:
        spec = os.fspath(spec)
        path = Path(spec.split("=", 1)[1] if _has_name_prefix(spec) else spec)
        if path.is_file() and path.name not in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as exc:
                raise AdapterFormatError(
                    f"{path} is not a text file listing adapters (not UTF-8: {exc}); give LoRA folders, Hub repo "
                    "ids, or a text file with one per line."
                ) from None
            listed = [line.split("#", 1)[0].strip() for line in lines]
            listed = [line for line in listed if line]
            if not listed:
                raise AdapterFormatError(f"{path} lists no adapters; write one LoRA folder or Hub repo id per line.")
            expanded += listed
        else:
            expanded.append(spec)
    if not expanded:
        raise UsageError("no adapters given: pass LoRA directories, Hub repo ids, or a text file listing them.")
    return expanded


def _has_name_prefix(spec: str) -> bool:
    head = spec.split("=", 1)[0]
    return "=" in spec and bool(_NAME_PATTERN.match(head)) and "/" not in head


def _split_spec(spec: str) -> tuple[str | None, str, str | None]:
    """`[NAME=]SOURCE[@REVISION]` → (name, source, revision)."""
    name = None
    if _has_name_prefix(spec):
        name, spec = spec.split("=", 1)
    revision = None
    if "@" in spec and not os.path.exists(spec):
        spec, revision = spec.rsplit("@", 1)
    return name, spec, revision


def _default_name(source: str) -> str:
    return Path(source.rstrip("/\\")).name


def _hub_files(source: str, revision: str | None, hub: HubOptions) -> tuple[Path, Path]:
    parts = source.strip("/").split("/")
    if len(parts) < 2:
        raise FileNotFoundError(
            f"adapter {source!r}: no such directory, and it is not a Hub repo id (owner/name). Check the path."
        )
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:]) or None
    config_path, weights_path = hub_download(
        repo_id,
        [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME],
        subfolder=subfolder,
        revision=revision,
        what="PEFT LoRA (safetensors)",
        error_cls=FileNotFoundError,
        token=hub.token,
        cache_dir=hub.cache_dir,
        local_files_only=hub.local_files_only,
    )
    return Path(config_path), Path(weights_path)


def _local_files(directory: Path, source: str) -> tuple[Path, Path]:
    config_path = directory / ADAPTER_CONFIG_NAME
    weights_path = directory / ADAPTER_WEIGHTS_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"adapter {source!r}: {config_path} is missing; this is not a PEFT adapter folder.")
    if not weights_path.is_file():
        has_bin = (directory / "adapter_model.bin").exists()
        hint = " (only adapter_model.bin: convert it to safetensors)" if has_bin else ""
        raise FileNotFoundError(f"adapter {source!r}: {weights_path} is missing{hint}.")
    return config_path, weights_path


def load_lora(spec: str, hub: HubOptions | None = None) -> LoraAdapter:
    """Resolves one `[NAME=]SOURCE[@REVISION]` spec to local files and scans its header.

    Args:
        spec: Local directory or Hub repo id (optionally with subfolder, `@revision` and `NAME=` prefix).
        hub: Hub download options.
    """
    hub = hub or HubOptions()
    name, source, revision = _split_spec(spec)
    directory = Path(source).expanduser()
    if directory.is_dir():
        config_path, weights_path = _local_files(directory, source)
        revision = None
    else:
        revision = revision or hub.revision
        config_path, weights_path = _hub_files(source, revision, hub)
    name = name or _default_name(source)
    check_path_component(name, f"adapter name (from {source!r}; choose one with NAME={source})")
    config = read_json_object(config_path, "LoRA adapter config")
    check_config(config, config_path)
    modules, saved = scan_modules(weights_path, config.get("modules_to_save"))
    adapter = LoraAdapter(name=name, source=spec, weights_path=weights_path, config=config, revision=revision,
                          modules=modules, saved=saved)
    for module_key in adapter.modules:
        adapter.scaling(module_key)  # validates ranks against the config
    return adapter


def _same_base(a: str | None, b: str | None) -> bool:
    """False only when two names that identify a model (Hub ids, bare names) differ.

    A local path says where a model was, not which one it is (the same model is often referenced by a Hub id in one
    adapter and by its download folder in another), so a path only warns; module shapes are still checked.
    """
    if not a or not b or a.rstrip("/").lower() == b.rstrip("/").lower():
        return True
    if looks_like_local_path(a) or looks_like_local_path(b):
        warn_once(
            ("compress", a, b),
            f"compressing adapters whose base_model_name_or_path differ ({a!r} and {b!r}); one is a local path, so "
            "they may be the same model. Module shapes match; make sure they are.",
            stacklevel=3,
        )
        return True
    return a.rstrip("/").split("/")[-1].lower() == b.rstrip("/").split("/")[-1].lower()


@dataclass
class CollectionSpec:
    """What all adapters of a collection share.

    Args:
        base_model_name_or_path: The common base model (first non-empty one).
        module_shapes: Per module key, `(in_features, out_features)`.
        target_modules: Module suffixes (e.g. `["k_proj", "q_proj", "v_proj"]`).
        task_type: The common PEFT task type.
    """

    base_model_name_or_path: str | None
    module_shapes: dict[str, tuple[int, int]]
    target_modules: list[str]
    task_type: str | None


def check_collection(adapters: Sequence[LoraAdapter], reference: CollectionSpec | None = None) -> CollectionSpec:
    """Checks that all adapters share base model, module keys and shapes (and match `reference` if given).

    Raises:
        BaseModelMismatchError, ShapeMismatchError, ValueError: naming the offending adapter file and the fix.
    """
    if not adapters:
        raise UsageError("no adapters to compress.")
    names: dict[str, str] = {}
    for adapter in adapters:
        if adapter.name in names:
            raise UsageError(
                f"two adapters are named {adapter.name!r} ({names[adapter.name]} and {adapter.source}); name them "
                "with NAME=SOURCE."
            )
        names[adapter.name] = adapter.source
    first = adapters[0]
    base = reference.base_model_name_or_path if reference else None
    base = base or next((a.base_model for a in adapters if a.base_model), None)
    shapes = reference.module_shapes if reference else {k: (m.in_features, m.out_features)
                                                         for k, m in first.modules.items()}
    where = "the collection" if reference else f"{first.weights_path}"
    for adapter in adapters:
        if not _same_base(base, adapter.base_model):
            raise BaseModelMismatchError(
                f"{adapter.weights_path}: adapter {adapter.name!r} was trained on base model {adapter.base_model!r}, "
                f"but {where} uses {base!r}. Compress adapters of one base model together."
            )
        keys = set(adapter.modules)
        if keys != set(shapes):
            extra, missing = sorted(keys - set(shapes)), sorted(set(shapes) - keys)
            raise ShapeMismatchError(
                f"{adapter.weights_path}: adapter {adapter.name!r} adapts other modules than {where}"
                f" (extra: {extra[:3]}{'…' if len(extra) > 3 else ''}, missing: {missing[:3]}"
                f"{'…' if len(missing) > 3 else ''}). All adapters must share target modules."
            )
        for module_key, shape in adapter.modules.items():
            if (shape.in_features, shape.out_features) != tuple(shapes[module_key]):
                raise ShapeMismatchError(
                    f"{adapter.weights_path}: module {module_key} is {shape.in_features}→{shape.out_features} but "
                    f"{where} has {shapes[module_key][0]}→{shapes[module_key][1]}; a different base model?"
                )
    task_types = {a.task_type for a in adapters if a.task_type}
    if len(task_types) > 1:
        raise AdapterFormatError(
            f"adapters have different task types {sorted(task_types)} (adapter_config.json `task_type`); compress "
            "them separately."
        )
    targets = sorted({key.rsplit(".", 1)[-1] for key in shapes})
    task_type = reference.task_type if reference else next(iter(task_types), None)
    return CollectionSpec(base_model_name_or_path=base, module_shapes=dict(shapes), target_modules=targets,
                          task_type=task_type)


def load_loras(specs: Iterable[str | os.PathLike], hub: HubOptions | None = None) -> list[LoraAdapter]:
    """Resolves all LoRA specs (expanding list files); see `load_lora`."""
    return [load_lora(spec, hub) for spec in expand_specs(specs)]
