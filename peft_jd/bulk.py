"""Bulk loading of many sigma adapters into one JD-LoRA model: files are read here (in threads), the model validates
and writes them (`JDLoraModel.load_sigma_adapters`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from tqdm.auto import tqdm

from .core import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterFormatError,
    AdapterSpec,
    JDLoraError,
    hub_download,
    looks_like_local_path,
    read_adapter_tensors,
)
from .tuner import JDLoraModel, SigmaAdapter


def read_sigma_adapter(
    source: str,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
    name: Optional[str] = None,
    **hub_kwargs,
) -> SigmaAdapter:
    """Reads one sigma adapter (config, Σ, `modules_to_save` tensors), local or on the Hub. Nothing is validated
    against bases here; `JDLoraModel.load_sigma_adapters` and the exporters do that.

    Args:
        source: Local adapter directory (or collection root with `subfolder`) or Hub repo id.
        revision: Hub revision.
        subfolder: Folder of the adapter inside `source`.
        name: Name of the adapter; defaults to its folder name / repo id.
        hub_kwargs: Passed to `huggingface_hub.hf_hub_download` (`token`, `cache_dir`, …).
    """
    name = name or default_adapter_name(source, subfolder)
    local_dir = os.path.join(source, subfolder or "")
    if os.path.isdir(local_dir):
        spec = AdapterSpec.from_directory(local_dir, name=name)
        weights_path = os.path.join(local_dir, ADAPTER_WEIGHTS_NAME)
    elif looks_like_local_path(source):
        raise AdapterFormatError(f"adapter {name!r}: {local_dir} is not a directory; check the path.")
    else:
        config_path, weights_path = hub_download(
            source,
            [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME],
            subfolder=subfolder,
            revision=revision,
            what="adapter",
            error_cls=JDLoraError,
            **hub_kwargs,
        )
        # Relative `bases` resolve inside the adapter's repo, at the adapter's revision.
        spec = AdapterSpec.from_directory(
            os.path.dirname(config_path), name=name, hub_repo=source, hub_subfolder=subfolder, hub_revision=revision
        )
    sigmas, saved_modules = read_adapter_tensors(spec, weights_path)
    return SigmaAdapter(name=name, spec=spec, sigmas=sigmas, saved_modules=saved_modules)


def default_adapter_name(source: str, subfolder: Optional[str] = None) -> str:
    """The name an adapter gets when none is given: its folder's name, or the repo id."""
    if subfolder:
        return os.path.basename(os.path.normpath(subfolder))
    return os.path.basename(os.path.normpath(source)) if os.path.isdir(source) else source


def load_adapters(
    model,
    sources: Sequence[str],
    adapter_names: Optional[Sequence[str]] = None,
    revision: Optional[str] = None,
    max_workers: int = 8,
    progress: bool = True,
    chunk_size: int = 256,
    subfolders: Optional[Sequence[Optional[str]]] = None,
    **hub_kwargs,
) -> list[str]:
    """Loads many JD-LoRA sigma adapters into a model that already holds one adapter of the same collection.

    Files are read in parallel threads. Each chunk of adapters is validated completely before anything is
    written: a bad adapter raises, naming the adapter and module, and leaves the model as it was before that chunk.
    A chunk is then written with one indexed copy per layer, so the cost per adapter is one small file read (no walk
    over the model's modules per adapter).

    Args:
        model: A `PeftModel` with at least one JD-LoRA adapter loaded (e.g. from `PeftModel.from_pretrained`).
        sources: Local adapter directories or Hub repo ids.
        adapter_names: Names to register them under; defaults to the directory name / repo id.
        revision: Hub revision for every source.
        max_workers: Threads reading adapter files.
        progress: Show a progress bar.
        chunk_size: Adapters validated and written together (bounds the Σ held in memory at once).
        subfolders: Per source, the adapter's folder inside it (e.g. `"adapters/task-17"` for a collection repo
            holding bases and adapters); names then default to the folder's last component.
        hub_kwargs: Passed to `huggingface_hub.hf_hub_download` (`token`, `cache_dir`, …).

    Returns:
        The names of the loaded adapters.
    """
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, JDLoraModel):
        raise TypeError(
            "load_adapters needs a PeftModel holding a JD-LoRA adapter; load one with "
            "PeftModel.from_pretrained(base_model, adapter) first."
        )
    sources = list(sources)
    folders = list(subfolders) if subfolders is not None else [None] * len(sources)
    names = list(adapter_names) if adapter_names is not None else list(map(default_adapter_name, sources, folders))
    if not len(names) == len(sources) == len(folders):
        raise ValueError(f"got {len(sources)} sources, {len(names)} adapter_names and {len(folders)} subfolders.")
    tuner.check_new_adapter_names(names)  # before reading any file

    def read(source: str, folder: Optional[str], name: str) -> SigmaAdapter:
        return read_sigma_adapter(source, revision, folder, name, **hub_kwargs)

    progress_bar = tqdm(total=len(names), desc="loading JD adapters", disable=not progress)
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        for start in range(0, len(names), chunk_size):
            chunk = slice(start, start + chunk_size)
            adapters = list(pool.map(read, sources[chunk], folders[chunk], names[chunk]))
            tuner.load_sigma_adapters(adapters, inference_mode=True, **hub_kwargs)
            progress_bar.update(len(adapters))
    progress_bar.close()
    return names
