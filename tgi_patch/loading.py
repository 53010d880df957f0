"""Loading a JD-LoRA adapter the way TGI's `utils/adapter.py::load_module_map` loads a LoRA.

`load_module_map` returns `(module_map, adapter_config, adapter_weight_names, adapter_tokenizer)`; TGI then calls
`LoraWeights.prepare_weights(config=adapter_config, module_map=...)` per layer type, which the patch routes to
`JDServingState.prepare` when the config is a `JDAdapterConfig`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from peft_jd.core import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterFormatError,
    AdapterSpec,
    SharedBases,
    hub_download,
    is_jd_adapter_dir,
    load_shared_bases,
    sigma_state_dict_key,
)

from .adapter_files import HubOrigin, bases_reference, load_sigmas, read_spec


logger = logging.getLogger(__name__)


@dataclass
class JDAdapterConfig:
    """TGI-side config of a loaded JD adapter (duck-types TGI's `AdapterConfig`).

    Args:
        base_model_name_or_path: Base model recorded in the adapter.
        spec: The adapter's parsed config.
        bases: The shared bases it is served with.
        sigmas: Module key → Σ (fp32, scaling folded in).
    """

    base_model_name_or_path: Optional[str]
    spec: AdapterSpec
    bases: SharedBases
    sigmas: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    @property
    def adapter_id(self) -> str:
        return self.spec.name


def adapter_directory(adapter_id: str, adapter_path: Optional[str], revision: Optional[str],
                      filenames: tuple[str, ...] = (ADAPTER_CONFIG_NAME,)) -> tuple[str, Optional[HubOrigin]]:
    """Local directory of an adapter given as TGI gives it (`id=path` or a Hub id), downloading `filenames` of a Hub
    adapter (through `peft_jd.core.hub_download`, into the Hub cache)."""
    if adapter_path:
        return adapter_path, None
    if os.path.isdir(adapter_id):
        return adapter_id, None
    paths = hub_download(adapter_id, list(filenames), revision=revision, what="JD-LoRA adapter")
    return os.path.dirname(paths[0]), HubOrigin(adapter_id, None, revision)


def is_jd_adapter(adapter_id: str, adapter_path: Optional[str], revision: Optional[str]) -> bool:
    """Whether TGI's adapter entry is a JD-LoRA sigma adapter (`peft_type == "JDLORA"`).

    Errors reading the config (missing, not downloadable) return `False` so that TGI's own loader reports them.
    """
    try:
        directory, _ = adapter_directory(adapter_id, adapter_path, revision)
    except Exception as exc:  # noqa: BLE001 - TGI's LoRA loader raises its own, familiar error for these
        logger.debug("could not read the adapter config of %s: %s", adapter_id, exc)
        return False
    return is_jd_adapter_dir(directory)


def load_jd_module_map(adapter_id: str, adapter_path: Optional[str], revision: Optional[str],
                       weight_names: tuple[str, ...], model_id: Optional[str] = None,
                       bases_override: Optional[str] = None) -> tuple[dict, JDAdapterConfig, set[str], None]:
    """`load_module_map` for a JD adapter.

    Args:
        adapter_id: Request id of the adapter.
        adapter_path: Local directory (TGI's `id=path` form), or `None` for a Hub adapter.
        revision: Hub revision of the adapter.
        weight_names: Module names of TGI's adapter-capable layers.
        model_id: The served model (only for a warning when the adapter names another base model).
        bases_override: Local bases directory replacing the adapter's reference.

    Raises:
        peft_jd errors naming the adapter and module when the adapter, its bases or the model disagree, and when it
        adapts modules that TGI cannot adapt (serving it partially would silently change its outputs).
    """
    directory, hub_origin = adapter_directory(adapter_id, adapter_path, revision,
                                              (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME))
    spec = read_spec(adapter_id, directory, hub_origin, bases_override)
    location, bases_revision, subfolder = bases_reference(spec, bases_override)
    bases = load_shared_bases(location, revision=bases_revision, subfolder=subfolder,
                              expected_fingerprint=spec.bases_fingerprint, adapter_name=adapter_id)
    sigmas = load_sigmas(spec, directory, bases.config, bases.key.describe())
    unservable = sorted(set(sigmas) - set(weight_names))
    if unservable:
        shown = ", ".join(unservable[:5]) + (" …" if len(unservable) > 5 else "")
        raise AdapterFormatError(
            f"adapter {adapter_id!r} adapts modules TGI cannot adapt for this model: {shown}. TGI applies adapters to "
            "q/k/v/o_proj, gate/up/down_proj (and qkv_proj, c_fc, c_proj); compress the collection for those modules."
        )
    if model_id and spec.base_model_name_or_path and not _same_name(spec.base_model_name_or_path, model_id):
        logger.warning("JD adapter %r was compressed for %r, served on %r; the layer shapes are checked.",
                       adapter_id, spec.base_model_name_or_path, model_id)
    config = JDAdapterConfig(spec.base_model_name_or_path, spec, bases, sigmas)
    module_map = {key: {"jd_sigma": (sigma, sigma_state_dict_key(key))} for key, sigma in sigmas.items()}
    return module_map, config, {sigma_state_dict_key(key) for key in sigmas}, None


def _same_name(a: str, b: str) -> bool:
    return a.rstrip("/").split("/")[-1].lower() == b.rstrip("/").split("/")[-1].lower()
