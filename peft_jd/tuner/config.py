"""`JDLoraConfig`: the configuration of one JD-LoRA (sigma) adapter."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ..core.spec import AdapterSpec, cluster_for, is_relative_reference, resolve_relative_bases
from .peft_type import JDLORA


@dataclass
class JDLoraConfig(PeftConfig):
    """
    Configuration of a JD-LoRA adapter: a per-adapter Σ on top of bases U, V shared by a whole collection.

    The update of a target module is `ΔW = scaling · U[c] Σ V[c]ᵀ`, with U, V read from the shared bases (see
    `bases`) and `c` the adapter's cluster for that module.

    Args:
        r (`int`):
            Shared rank k of the bases (Σ is `r×r` for `sigma_type="full"`, an `r`-vector for `"diag"`).
        rank_pattern (`dict[str, int]`):
            Module key → rank, for the modules whose rank differs from `r` (budgeted compression allocates ranks per
            module). Keys are exact module names, as the compressor writes them.
        sigma_type (`str`):
            `"full"` or `"diag"`.
        target_modules (`Union[list[str], str]`):
            Module names (suffixes) or regex of the adapted modules, as in `LoraConfig`.
        scaling (`float`):
            Multiplier of the update. Compression folds each LoRA's `lora_alpha / r` into Σ, so this is 1.0 for
            compressed adapters.
        bases (`str`):
            Hub repo id or local directory of the shared bases. A path starting with `./` or `../` is resolved
            relative to the adapter directory (or, for a Hub adapter, relative to its folder in the same repo).
        bases_revision (`str`, *optional*):
            Commit sha of the bases repo the adapter was compressed against. Loading never falls back to another
            revision.
        bases_subfolder (`str`, *optional*):
            Folder of the bases inside `bases`.
        bases_fingerprint (`str`, *optional*):
            sha256 of the bases weights file; checked against the loaded bases.
        cluster (`Union[int, dict[str, int]]`):
            The adapter's cluster: one id for all modules, or a dict from module key to cluster id.
        fan_in_fan_out (`bool`):
            Kept for PEFT compatibility; only `False` (`nn.Linear`) is supported.
        modules_to_save (`list[str]`, *optional*):
            Modules (e.g. a classification head) trained and saved whole per adapter, through PEFT's own
            `ModulesToSaveWrapper`, as with `LoraConfig`. They are stored uncompressed in the adapter file.
    """

    r: int = field(default=16, metadata={"help": "Shared rank of the bases."})
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Module key -> rank, where it "
                                                                           "differs from r."})
    sigma_type: Literal["full", "diag"] = field(default="full", metadata={"help": "'full' or 'diag' Σ."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex of the adapted modules."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip."})
    scaling: float = field(default=1.0, metadata={"help": "Multiplier of the update U Σ Vᵀ."})
    bases: Optional[str] = field(default=None, metadata={"help": "Hub repo id or local path of the shared bases."})
    bases_revision: Optional[str] = field(default=None, metadata={"help": "Commit sha of the bases repo."})
    bases_subfolder: Optional[str] = field(default=None, metadata={"help": "Subfolder of the bases."})
    bases_fingerprint: Optional[str] = field(default=None, metadata={"help": "sha256 of the bases weights file."})
    cluster: Union[int, dict[str, int]] = field(default=0, metadata={"help": "Cluster id, or module key -> id."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Only False is supported."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = JDLORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if self.sigma_type not in ("full", "diag"):
            raise ValueError(f"sigma_type must be 'full' or 'diag', got {self.sigma_type!r}.")
        if self.r <= 0:
            raise ValueError(f"r must be positive, got {self.r}.")
        if self.fan_in_fan_out:
            raise ValueError("JD-LoRA supports nn.Linear-style layers only (fan_in_fan_out=False).")

    def cluster_of(self, module_key: str) -> int:
        """Cluster id of this adapter for `module_key`."""
        return cluster_for(self.cluster, module_key, "<adapter>")

    def to_spec(self, adapter_name: str, source: Optional[str] = None) -> AdapterSpec:
        """This config as the core's `AdapterSpec` (the form every validation takes); `source` (for messages)
        defaults to where `from_pretrained` read the config."""
        source = source or getattr(self, "_loaded_from", None) or "<config>"
        return AdapterSpec.from_config(self.to_dict(), adapter_name, source=source)

    @classmethod
    def from_spec(cls, spec: AdapterSpec, inference_mode: bool = True) -> JDLoraConfig:
        """The config of an adapter read by the core (`AdapterSpec`), its relative `bases` already resolved.

        Keys this PEFT release does not know (written by a newer one) are dropped, as `PeftConfig.from_pretrained`
        does.
        """
        known = {f.name for f in fields(cls) if f.init} - {"peft_type"}
        kwargs = {key: value for key, value in spec.config.items() if key in known}
        kwargs.update(
            bases=spec.bases,
            bases_revision=spec.bases_revision,
            bases_subfolder=spec.bases_subfolder,
            inference_mode=inference_mode,
        )
        config = cls(**kwargs)
        config._loaded_from = spec.source
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Loads the config and resolves a relative `bases` against the adapter's own location."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        # Not a dataclass field, so never serialised: only names the adapter's origin in error messages.
        config._loaded_from = "/".join(filter(None, (str(pretrained_model_name_or_path), subfolder)))
        if config.bases and is_relative_reference(config.bases):
            config.bases, config.bases_subfolder = resolve_relative_bases(
                config.bases, config.bases_subfolder, str(pretrained_model_name_or_path), subfolder
            )
            if config.bases_revision is None and not os.path.isdir(config.bases):
                config.bases_revision = kwargs.get("revision")
        return config
