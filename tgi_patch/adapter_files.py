"""What TGI serving adds to the core's reading of a sigma adapter: where a Hub adapter came from, the `--jd-lora-bases`
override, the refusal of what TGI cannot serve, and Σ with the adapter's scaling folded in.

Parsing the config (`peft_jd.core.AdapterSpec`) and checking the adapter against its bases
(`peft_jd.core.validate_against_bases`) belong to the core. The launcher (before TGI starts) and the shards (when they
load Σ) both go through `read_spec` and `load_sigmas`, so they refuse the same adapters, NaN/inf Σ included.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from peft_jd.core import (
    ADAPTER_WEIGHTS_NAME,
    AdapterFormatError,
    AdapterSpec,
    BasesConfig,
    read_adapter_tensors,
    validate_against_bases,
)


@dataclass(frozen=True)
class HubOrigin:
    """Where a Hub-hosted adapter lives: its repo, its folder inside the repo and the revision it was read at.

    A relative `bases` in its config then names a folder of that repo (at that revision), not of the local cache.
    """

    repo_id: str
    subfolder: Optional[str] = None
    revision: Optional[str] = None


def read_spec(name: str, directory: str, hub_origin: Optional[HubOrigin] = None,
              bases_override: Optional[str] = None) -> AdapterSpec:
    """The parsed config of the sigma adapter in `directory`, refused if TGI cannot serve all of it.

    Args:
        name: Request id of the adapter (used in messages).
        directory: Local folder holding its config and weights.
        hub_origin: Set when `directory` is a Hub download: a relative `bases` then resolves inside that repo.
        bases_override: Local bases directory the adapter will be served with; its own `bases` reference is then
            not resolved (it may point outside the Hub repo it came from).

    Raises:
        `AdapterFormatError` for a config that is not a JD-LoRA sigma adapter, or one with `modules_to_save`.
    """
    origin = None if bases_override else hub_origin
    spec = AdapterSpec.from_directory(
        directory,
        name=name,
        hub_repo=origin.repo_id if origin else None,
        hub_subfolder=origin.subfolder if origin else None,
        hub_revision=origin.revision if origin else None,
    )
    if spec.modules_to_save:
        # TGI's adapter layers add low-rank updates; they cannot swap whole modules (heads, embeddings), so part of
        # the adapter would be silently dropped.
        raise AdapterFormatError(
            f"adapter {name!r} ({directory}) stores whole modules {spec.modules_to_save} (`modules_to_save`), which "
            "TGI cannot serve. Serve it with the PEFT tuner (`PeftModel.from_pretrained`), or compress the "
            "collection without modules_to_save."
        )
    return spec


def bases_reference(spec: AdapterSpec, override: Optional[str] = None) -> tuple[str, Optional[str], Optional[str]]:
    """`(location, revision, subfolder)` of the bases an adapter is served with, as `load_shared_bases` takes them.

    Args:
        spec: The adapter.
        override: A local bases directory that replaces the adapter's own reference (`--jd-lora-bases`, or the
            directory the launcher validated); the fingerprint the adapter records is still checked.
    """
    if override:
        return os.path.abspath(override), None, None
    return spec.bases_reference()


def load_sigmas(spec: AdapterSpec, directory: str, bases_config: BasesConfig, bases_label: str
                ) -> dict[str, torch.Tensor]:
    """Module key → Σ of the adapter in `directory` (fp32, scaling folded in), validated against the bases.

    The core's `validate_against_bases` checks Σ type, rank, fingerprint, module coverage, Σ shapes, clusters and that
    every Σ is finite float.

    Args:
        spec: The adapter's parsed config.
        directory: Its local folder.
        bases_config: The config of the bases it is served with.
        bases_label: How to name the bases in messages.
    """
    sigmas, _ = read_adapter_tensors(spec, os.path.join(directory, ADAPTER_WEIGHTS_NAME))
    validate_against_bases(spec, sigmas, bases_config, bases_label)
    # TGI's layers add U Σ Vᵀ x without a per-adapter multiplier: fold the scaling into Σ once, at load.
    return {module_key: sigma.to(torch.float32) * spec.scaling for module_key, sigma in sigmas.items()}
