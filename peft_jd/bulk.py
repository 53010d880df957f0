"""Bulk loading of many sigma adapters into one JD-LoRA model, bypassing PEFT's per-adapter module walk."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from safetensors.torch import load_file
from tqdm.auto import tqdm

from .core import ADAPTER_WEIGHTS_NAME, AdapterFormatError, check_finite, module_key_from_sigma_key
from .tuner.config import JDLoraConfig
from .tuner.model import JDLoraModel
from .tuner.slots import check_adapter_name


def read_sigma_adapter(
    source: str, revision: Optional[str], hub_kwargs: dict, subfolder: Optional[str] = None
) -> tuple[JDLoraConfig, dict]:
    """Config (relative `bases` resolved) and Σ tensors of one sigma adapter, local or on the Hub."""
    local_dir = os.path.join(source, subfolder or "")
    if os.path.isdir(local_dir):
        weights_path = os.path.join(local_dir, ADAPTER_WEIGHTS_NAME)
        if not os.path.isfile(weights_path):
            raise AdapterFormatError(f"adapter {local_dir!r}: {ADAPTER_WEIGHTS_NAME} is missing.")
        config = JDLoraConfig.from_pretrained(source, subfolder=subfolder)
    else:
        from huggingface_hub import hf_hub_download

        weights_path = hf_hub_download(
            source, ADAPTER_WEIGHTS_NAME, subfolder=subfolder, revision=revision, **hub_kwargs
        )
        # Read through the repo id so that relative `bases` resolve inside the repo.
        config = JDLoraConfig.from_pretrained(source, subfolder=subfolder, revision=revision, **hub_kwargs)
    where = source if not subfolder else f"{source}/{subfolder}"
    sigmas = {module_key_from_sigma_key(k): v for k, v in load_file(weights_path).items()}
    for module_key, sigma in sigmas.items():
        check_finite(sigma, f"adapter {where!r}, Σ of module {module_key}")
    return config, sigmas


def _default_name(source: str, subfolder: Optional[str]) -> str:
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
    names = list(adapter_names) if adapter_names is not None else list(map(_default_name, sources, folders))
    if not len(names) == len(sources) == len(folders):
        raise ValueError(f"got {len(sources)} sources, {len(names)} adapter_names and {len(folders)} subfolders.")
    for name in names:
        check_adapter_name(name)
    repeated = {name for name, count in Counter(names).items() if count > 1}
    duplicates = sorted({n for n in names if n in tuner.peft_config} | repeated)
    if duplicates:
        raise ValueError(
            f"adapter name(s) already loaded or repeated: {duplicates[:10]}; pass distinct adapter_names."
        )
    layers = tuner.jd_layers()
    progress_bar = tqdm(total=len(names), desc="loading JD adapters", disable=not progress)
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        for start in range(0, len(names), chunk_size):
            chunk_names = names[start : start + chunk_size]
            chunk_sources = sources[start : start + chunk_size]
            chunk_folders = folders[start : start + chunk_size]
            read = list(
                pool.map(lambda s, f: read_sigma_adapter(s, revision, hub_kwargs, f), chunk_sources, chunk_folders)
            )
            _add_adapters(tuner, layers, chunk_names, chunk_sources, read)
            progress_bar.update(len(chunk_names))
    progress_bar.close()
    return names


def _validate(tuner, layers: dict, name: str, source: str, config: JDLoraConfig, sigmas: dict):
    shared = tuner._resolve_bases(config, name if name == source else f"{name} ({source})")
    unknown = sorted(set(sigmas) - set(layers))
    if unknown:
        raise AdapterFormatError(
            f"adapter {source!r} has Σ for module(s) {unknown[:5]} that this model does not adapt; it targets "
            "other modules than the loaded collection."
        )
    for module_key, sigma in sigmas.items():
        layers[module_key]._check_new_sigmas(
            [name], [sigma], [config.cluster_of(module_key)], config.r, config.sigma_type, module_key
        )
    return shared


def _add_adapters(tuner, layers: dict, names: list[str], sources: list[str], read: list[tuple]) -> None:
    """Validates a chunk of adapters completely, then writes it with one indexed copy per layer."""
    shared = None
    for name, source, (config, sigmas) in zip(names, sources, read):
        shared = _validate(tuner, layers, name, source, config, sigmas)
        config.inference_mode = True
    per_layer: dict[str, list] = {}
    for name, (config, sigmas) in zip(names, read):
        for module_key, sigma in sigmas.items():
            entry = (name, sigma, config.cluster_of(module_key), config.scaling, config)
            per_layer.setdefault(module_key, []).append(entry)
    tuner.slot_table.reserve(len(names))
    try:
        for name, (config, _) in zip(names, read):
            tuner.peft_config[name] = config
            tuner._check_new_adapter_config(config)
        for module_key, entries in per_layer.items():
            layer = layers[module_key]
            layer.attach_bases(shared, module_key)
            config = entries[0][4]
            layer.add_sigmas(
                [e[0] for e in entries],
                [e[1] for e in entries],
                [e[2] for e in entries],
                [e[3] for e in entries],
                rank=config.r,
                sigma_type=config.sigma_type,
                inference_mode=True,
                module_key=module_key,
            )
    except Exception:
        for name in names:
            for layer in layers.values():
                if name in layer.jd_sigma:
                    layer.delete_adapter(name)
            tuner.peft_config.pop(name, None)
            tuner.slot_table.release(name)
        raise
