"""Finding and checking JD sigma adapters named by vLLM's `LoRARequest`s (a folder, a collection, or a Hub id).

vLLM's `LoRARequest` has no adapter-type field, so a request is JD when the files at its `lora_path` say
`peft_type: JDLORA`. Parsing and validation are the core's (`AdapterSpec`, `validate_against_bases`,
`read_adapter_tensors`); this module only decides where the files are and what a vLLM server can serve.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from peft_jd.core import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    BASES_CONFIG_NAME,
    AdapterSpec,
    BasesConfig,
    BasesKey,
    adapter_dir,
    adapter_subfolder,
    hub_download,
    is_collection_root,
    is_jd_adapter_dir,
    looks_like_local_path,
    read_adapter_tensors,
    resolve_bases_key,
    validate_against_bases,
)
from peft_jd.core.errors import AdapterFormatError, BasesNotFoundError, JDLoraError, UnknownAdapterError


__all__ = ["JD_EXTRA_KEY", "JDAdapterRef", "bases_config_of", "locate_jd_adapter", "read_checked_sigmas"]

# Key of the JD adapter reference in `SamplingParams.extra_args` (how the front end tells the worker).
JD_EXTRA_KEY = "vllm_jd"


@dataclass(frozen=True)
class JDAdapterRef:
    """A JD adapter as the front end hands it to the worker.

    Args:
        name: Serving name (`"model"` in the OpenAI API).
        int_id: vLLM's `lora_int_id` of this load (a reload gets a new one, so a new Σ row).
        directory: Local folder holding `adapter_config.json` and `adapter_model.safetensors`.
        hub_repo: Hub repo the folder was downloaded from (relative bases resolve inside it).
        hub_subfolder: Folder of the adapter inside `hub_repo`.
        hub_revision: Revision of `hub_repo`.
    """

    name: str
    int_id: int
    directory: str
    hub_repo: Optional[str] = None
    hub_subfolder: Optional[str] = None
    hub_revision: Optional[str] = None

    @property
    def key(self) -> str:
        """Identity of this adapter version in the worker's slot table."""
        return f"{self.name}#{self.int_id}@{self.directory}"

    def to_extra(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_extra(cls, data: dict[str, Any]) -> JDAdapterRef:
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})

    def spec(self) -> AdapterSpec:
        return AdapterSpec.from_directory(
            self.directory, name=self.name, hub_repo=self.hub_repo, hub_subfolder=self.hub_subfolder,
            hub_revision=self.hub_revision,
        )


def _hub_adapter(repo: str, subfolder: Optional[str], revision: Optional[str]) -> Optional[str]:
    """Local folder of a Hub adapter whose config says JDLORA, or None when there is none / it is not JD."""
    try:
        (config_path,) = hub_download(
            repo, [ADAPTER_CONFIG_NAME], subfolder=subfolder, revision=revision, what="adapter",
            error_cls=UnknownAdapterError,
        )
    except JDLoraError:
        return None
    directory = os.path.dirname(config_path)
    if not is_jd_adapter_dir(directory):
        return None
    hub_download(repo, [ADAPTER_WEIGHTS_NAME], subfolder=subfolder, revision=revision, what="adapter",
                 error_cls=AdapterFormatError)
    return directory


def locate_jd_adapter(name: str, path: str, int_id: int = 0, collection_only: bool = False) -> Optional[JDAdapterRef]:
    """The JD adapter `name` at `path`, or None when `path` is not JD (vLLM's own LoRA handling then applies).

    Args:
        name: The adapter's serving name.
        path: A sigma adapter folder, a collection root (its adapter `name` is served), or a Hub repo id of either
            (`repo` or `repo@revision`).
        int_id: vLLM's `lora_int_id` for this load.
        collection_only: Only look for `name` inside a collection (the resolver: a bare adapter folder or repo
            must not answer for every name).

    Raises:
        UnknownAdapterError: `path` is a JD collection without an adapter called `name`.
    """
    if os.path.isdir(path):
        if is_jd_adapter_dir(path) and not collection_only:
            return JDAdapterRef(name, int_id, os.path.abspath(path))
        if is_collection_root(path):
            directory = adapter_dir(path, name)
            if not is_jd_adapter_dir(directory):
                raise UnknownAdapterError(
                    f"JD collection {path!r} has no adapter {name!r} (no {directory}/{ADAPTER_CONFIG_NAME}); "
                    "check the name, or add the adapter with `peft-jd add`."
                )
            return JDAdapterRef(name, int_id, os.path.abspath(directory))
        return None
    repo, _, revision = path.partition("@")
    if looks_like_local_path(path) or repo.count("/") != 1:
        return None
    for subfolder in ((adapter_subfolder(name),) if collection_only else (None, adapter_subfolder(name))):
        directory = _hub_adapter(repo, subfolder, revision or None)
        if directory is not None:
            return JDAdapterRef(name, int_id, directory, repo, subfolder, revision or None)
    return None


def bases_config_of(spec: AdapterSpec) -> tuple[BasesKey, BasesConfig]:
    """Key and config of the bases an adapter points to, reading only `jd_bases_config.json` (no U/V)."""
    key = resolve_bases_key(*spec.bases_reference())
    local = os.path.join(key.location, key.subfolder or "")
    if os.path.isdir(local):
        path = os.path.join(local, BASES_CONFIG_NAME)
        if not os.path.isfile(path):
            raise BasesNotFoundError(
                f"bases directory {local!r} (needed by adapter {spec.name!r}) has no {BASES_CONFIG_NAME}; "
                "re-run the compression or pull the collection again."
            )
    elif looks_like_local_path(key.location):
        raise BasesNotFoundError(
            f"bases directory {local!r} (needed by adapter {spec.name!r}) does not exist; fix `bases` in its config."
        )
    else:
        (path,) = hub_download(key.location, [BASES_CONFIG_NAME], subfolder=key.subfolder, revision=key.revision,
                               what="bases", error_cls=BasesNotFoundError)
    return key, BasesConfig.from_file(path)


def read_checked_sigmas(spec: AdapterSpec, directory: str, bases_config: BasesConfig,
                        bases_label: str) -> dict[str, torch.Tensor]:
    """Σ by module key of an adapter, validated against the bases it will be served with.

    Raises the core's typed errors; `modules_to_save` are refused (vLLM serves one shared copy of every module).
    """
    sigmas, saved = read_adapter_tensors(spec, os.path.join(directory, ADAPTER_WEIGHTS_NAME))
    if saved or spec.modules_to_save:
        raise AdapterFormatError(
            f"adapter {spec.name!r} has modules_to_save {spec.modules_to_save}; the vLLM plugin serves only Σ "
            "adapters. Serve it with the PEFT tuner, or re-export it without modules_to_save."
        )
    validate_against_bases(spec, sigmas, bases_config, bases_label)
    return sigmas
