"""Reading JD-LoRA sigma adapters without PEFT: config, bases reference, Σ tensors, and checks against the bases.

Used by the launcher (cheap checks from file headers, before TGI starts) and by the shards (loading the Σ).
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ._core import import_core


PEFT_TYPE = "JDLORA"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def _errors():
    return import_core("errors")


def read_adapter_config(directory: str, adapter_id: str = "<adapter>") -> dict[str, Any]:
    """Parsed `adapter_config.json` of a local adapter directory; clear errors when missing or malformed."""
    path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(path):
        raise _errors().AdapterFormatError(
            f"adapter {adapter_id!r}: {path} does not exist; the directory is not a PEFT adapter (or the download "
            "is incomplete)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as exc:
        raise _errors().AdapterFormatError(f"adapter {adapter_id!r}: {path} is not valid JSON ({exc}).") from exc
    if not isinstance(config, dict):
        raise _errors().AdapterFormatError(f"adapter {adapter_id!r}: {path} must hold a JSON object.")
    return config


def is_jd_config(config: dict[str, Any]) -> bool:
    return str(config.get("peft_type", "")).upper() == PEFT_TYPE


def _is_relative(path: str) -> bool:
    return path in (".", "..") or path.startswith("./") or path.startswith("../")


@dataclass
class HubOrigin:
    """Where a Hub-hosted adapter lives: its repo, folder inside the repo and revision."""

    repo_id: str
    subfolder: Optional[str] = None
    revision: Optional[str] = None


@dataclass
class JDAdapterSpec:
    """A JD-LoRA sigma adapter on local disk and what its config says.

    Args:
        adapter_id: Name requests use to select the adapter.
        directory: Local directory holding `adapter_config.json` and `adapter_model.safetensors`.
        config: The parsed adapter config.
        hub_origin: Set when `directory` is a Hub download; relative `bases` then resolve inside that repo.
    """

    adapter_id: str
    directory: str
    config: dict[str, Any]
    hub_origin: Optional[HubOrigin] = None

    @classmethod
    def from_directory(cls, adapter_id: str, directory: str, hub_origin: Optional[HubOrigin] = None) -> JDAdapterSpec:
        config = read_adapter_config(directory, adapter_id)
        if not is_jd_config(config):
            raise _errors().AdapterFormatError(
                f"adapter {adapter_id!r} ({directory}) has peft_type={config.get('peft_type')!r}, not {PEFT_TYPE!r}. "
                "Pass plain LoRA adapters with --lora-adapters and JD-LoRA sigma adapters with --jd-lora-adapters."
            )
        spec = cls(adapter_id=adapter_id, directory=directory, config=config, hub_origin=hub_origin)
        if spec.sigma_type not in ("full", "diag") or spec.r <= 0:
            raise _errors().AdapterFormatError(
                f"adapter {adapter_id!r}: invalid r={spec.r!r} / sigma_type={spec.sigma_type!r} in its config."
            )
        return spec

    @property
    def r(self) -> int:
        return int(self.config.get("r", 0))

    @property
    def sigma_type(self) -> str:
        return str(self.config.get("sigma_type", "full"))

    @property
    def scaling(self) -> float:
        return float(self.config.get("scaling", 1.0))

    @property
    def base_model_name_or_path(self) -> Optional[str]:
        return self.config.get("base_model_name_or_path")

    @property
    def bases_fingerprint(self) -> Optional[str]:
        return self.config.get("bases_fingerprint") or None

    @property
    def weights_path(self) -> str:
        return os.path.join(self.directory, ADAPTER_WEIGHTS_NAME)

    def cluster_of(self, module_key: str) -> int:
        cluster = self.config.get("cluster", 0)
        if isinstance(cluster, dict):
            if module_key not in cluster:
                raise _errors().AdapterFormatError(
                    f"adapter {self.adapter_id!r} has a Σ for module {module_key!r} but no cluster for it in its "
                    "config's `cluster` map; the adapter files are inconsistent. Re-export the adapter."
                )
            return int(cluster[module_key])
        return int(cluster)

    def bases_reference(self, override: Optional[str] = None) -> tuple[str, Optional[str], Optional[str]]:
        """`(location, revision, subfolder)` of the adapter's bases, as `peft_jd.core.bases_store` takes them.

        Args:
            override: A local bases directory that replaces the adapter's own reference (the fingerprint is still
                checked when the bases load).
        """
        if override:
            return os.path.abspath(override), None, None
        bases = self.config.get("bases")
        if not bases:
            raise _errors().BasesNotFoundError(
                f"adapter {self.adapter_id!r} has no `bases` in its config; pass the bases directory with "
                "--jd-lora-bases."
            )
        subfolder = self.config.get("bases_subfolder") or None
        revision = self.config.get("bases_revision") or None
        if not _is_relative(bases):
            return bases, revision, subfolder
        if self.hub_origin is None:
            return os.path.normpath(os.path.join(self.directory, bases)), None, subfolder
        folder = posixpath.normpath(posixpath.join(self.hub_origin.subfolder or "", bases, subfolder or ""))
        if folder.startswith(".."):
            raise _errors().BasesNotFoundError(
                f"adapter {self.adapter_id!r} points to bases {bases!r} outside its Hub repo "
                f"{self.hub_origin.repo_id!r}; serve it from a local copy of the collection, or pass --jd-lora-bases."
            )
        return self.hub_origin.repo_id, revision or self.hub_origin.revision, (None if folder == "." else folder)


def sigma_shapes(spec: JDAdapterSpec) -> dict[str, tuple[int, ...]]:
    """Module key → Σ shape, read from the safetensors header only (no tensor data is loaded)."""
    from safetensors import safe_open

    if not os.path.isfile(spec.weights_path):
        raise _errors().AdapterFormatError(
            f"adapter {spec.adapter_id!r}: {spec.weights_path} does not exist; the adapter has no Σ weights."
        )
    fmt = import_core("format")
    shapes = {}
    with safe_open(spec.weights_path, framework="pt") as f:
        for key in f.keys():
            try:
                module_key = fmt.module_key_from_sigma_key(key)
            except ValueError as exc:
                raise _errors().AdapterFormatError(
                    f"adapter {spec.adapter_id!r} ({spec.weights_path}): {exc}"
                ) from exc
            shapes[module_key] = tuple(f.get_slice(key).get_shape())
    if not shapes:
        raise _errors().AdapterFormatError(f"adapter {spec.adapter_id!r}: {spec.weights_path} holds no Σ tensor.")
    return shapes


def check_against_bases(spec: JDAdapterSpec, shapes: dict[str, tuple[int, ...]], bases_config: Any,
                        bases_label: str) -> None:
    """Checks rank, Σ type, fingerprint, module coverage, Σ shapes and clusters of an adapter against its bases.

    Args:
        spec: The adapter.
        shapes: Its Σ shapes (`sigma_shapes`).
        bases_config: The `peft_jd.core.BasesConfig` of the bases it will be served with.
        bases_label: How to name the bases in messages.
    """
    errors = _errors()
    if spec.r != bases_config.r or spec.sigma_type != bases_config.sigma_type:
        raise errors.SigmaTypeMismatchError(
            f"adapter {spec.adapter_id!r} has r={spec.r}, sigma_type={spec.sigma_type!r} but bases {bases_label} have "
            f"r={bases_config.r}, sigma_type={bases_config.sigma_type!r}."
        )
    expected = spec.bases_fingerprint
    if expected and bases_config.fingerprint and expected != bases_config.fingerprint:
        raise errors.BasesMismatchError(
            f"adapter {spec.adapter_id!r} was compressed against bases with fingerprint {expected[:12]}…, but "
            f"{bases_label} has {bases_config.fingerprint[:12]}…. Serve the bases revision the adapter records, or "
            "re-project the adapter with `peft-jd add`."
        )
    want = (spec.r, spec.r) if spec.sigma_type == "full" else (spec.r,)
    for module_key, shape in shapes.items():
        module = bases_config.modules.get(module_key)
        if module is None:
            raise errors.BasesNotFoundError(
                f"adapter {spec.adapter_id!r} has a Σ for module {module_key!r}, which bases {bases_label} do not "
                "cover. The adapter belongs to another collection."
            )
        if tuple(shape) != want:
            raise errors.ShapeMismatchError(
                f"adapter {spec.adapter_id!r}: Σ of {module_key} has shape {tuple(shape)}, expected {want}."
            )
        cluster = spec.cluster_of(module_key)
        if not 0 <= cluster < module.num_clusters:
            raise errors.ShapeMismatchError(
                f"adapter {spec.adapter_id!r} uses cluster {cluster} for {module_key}, but bases {bases_label} have "
                f"{module.num_clusters} cluster(s) for it. The adapter was compressed against other bases."
            )


def load_sigmas(spec: JDAdapterSpec, bases_config: Any, bases_label: str) -> dict[str, torch.Tensor]:
    """Module key → Σ (fp32, scaling folded in), after `check_against_bases` and a NaN/inf check."""
    from safetensors.torch import load_file

    fmt = import_core("format")
    check_against_bases(spec, sigma_shapes(spec), bases_config, bases_label)
    sigmas = {}
    for key, tensor in load_file(spec.weights_path).items():
        module_key = fmt.module_key_from_sigma_key(key)
        fmt.check_finite(tensor, f"Σ of module {module_key} in adapter {spec.adapter_id!r} ({spec.weights_path})")
        sigmas[module_key] = tensor.to(torch.float32) * spec.scaling
    return sigmas
