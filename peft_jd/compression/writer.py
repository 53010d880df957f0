"""The one writer of a collection's sigma adapters (used by `compress` and `add`) and the rules of what a collection
writer may replace.

Every collection write (`compress`, `add`) holds `writer_lock(collection)` for its whole run and publishes the whole
collection folder with one atomic swap (`atomic_directory(..., kind=KIND_COLLECTION)`): readers and crashes see the
old or the new collection, never a mix. `add` builds the new folder from hard links of the current one (no copy of
the bases; every peft-jd writer replaces files by rename, never in place, so the two folders never share a change).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..core import (
    ADAPTERS_DIR,
    BASES_DIR,
    KIND_COLLECTION,
    MARKER_NAME,
    AdapterFormatError,
    BasesConfig,
    DestinationError,
    adapter_dir,
    check_replaceable,
    read_marker,
    recover_interrupted_swap,
    write_sigma_adapter,
)
from ..tuner.config import JDLoraConfig
from .lora_io import LoraAdapter
from .report import CompressionReport


logger = logging.getLogger(__name__)
# How a sigma adapter finds the shared bases of its collection: relative to its own folder `adapters/<name>/`, so
# the collection can be moved, pushed as one Hub repo, or pulled.
RELATIVE_BASES = f"../../{BASES_DIR}"


def cluster_value(clusters: Mapping[str, int]) -> int | dict[str, int]:
    """One cluster id when every module uses the same, else the module → cluster map."""
    ids = set(clusters.values())
    return next(iter(ids)) if len(ids) == 1 else dict(clusters)


def write_collection_adapter(
    root: str | os.PathLike,
    adapter: LoraAdapter,
    sigmas: Mapping[str, torch.Tensor],
    clusters: Mapping[str, int],
    bases_config: BasesConfig,
    target_modules: list[str] | str,
    task_type: str | None,
    card: str,
    sigma_dtype: torch.dtype = torch.float32,
) -> None:
    """Writes `root/adapters/<adapter.name>/`: Σ per module, its clusters, the relative bases reference with the
    bases fingerprint, and the adapter's `modules_to_save` tensors carried over uncompressed.

    Args:
        root: The collection folder being written (a temporary sibling of the published one).
        adapter: The LoRA the Σ were computed from.
        sigmas: Σ per module key.
        clusters: Cluster per module key.
        bases_config: Config of the collection's bases (rank, Σ type, fingerprint, base model).
        target_modules: `target_modules` of the sigma adapter.
        task_type: PEFT task type.
        card: Its README.md.
        sigma_dtype: Storage dtype of Σ.
    """
    config = JDLoraConfig(
        r=bases_config.r, rank_pattern=bases_config.rank_pattern(), sigma_type=bases_config.sigma_type,
        target_modules=target_modules, bases=RELATIVE_BASES,
        bases_fingerprint=bases_config.fingerprint, cluster=cluster_value(clusters),
        base_model_name_or_path=bases_config.base_model_name_or_path, task_type=task_type, inference_mode=True,
        modules_to_save=adapter.modules_to_save,
    )
    write_sigma_adapter(adapter_dir(root, adapter.name), sigmas, config, readme=card,
                        saved_tensors=adapter.read_saved_tensors(), dtype=sigma_dtype)


# ------------------------------------------------------------------------------------------------- destinations
def check_compress_destination(out_dir: Path, new_names: Iterable[str], overwrite: bool) -> None:
    """Refuses, before any work, an output folder `compress` must not replace (call under the writers' lock).

    A non-empty folder that is not a peft-jd collection needs `overwrite`; so does a collection holding adapters
    that `peft-jd add` put there and that are not among the new inputs (recompressing would drop them).
    """
    recover_interrupted_swap(out_dir)
    check_replaceable(out_dir, KIND_COLLECTION, overwrite)
    if overwrite or read_marker(out_dir) != KIND_COLLECTION:
        return
    try:
        report = CompressionReport.load_optional(out_dir)
    except AdapterFormatError as exc:
        logger.warning("%s; replacing the collection without checking for adapters added with `peft-jd add`.", exc)
        return
    dropped = [name for name in report.added_adapters() if name not in set(new_names)] if report else []
    if dropped:
        sources = ", ".join(f"{name}={report.adapters[name]['source']}" for name in dropped[:10])
        raise DestinationError(
            f"{out_dir} holds {len(dropped)} adapter(s) added with `peft-jd add` that are not among the new inputs: "
            f"{', '.join(dropped[:10])}{' …' if len(dropped) > 10 else ''}. Recompressing would delete them; nothing "
            f"was written. Add their LoRAs to the inputs ({sources}), or pass --overwrite (overwrite=True) to drop "
            "them."
        )


def link_tree(source: Path, target: Path) -> None:
    """Fills the (existing, empty) folder `target` with hard links to the files of `source` (copies where the file
    system has no hard links). The marker is left out (its writer adds it), and so are temporary folders of writes
    interrupted inside the collection by versions without the collection lock."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    def ignored(folder: str, names: list[str]) -> list[str]:
        skip = [name for name in names if name.startswith((".tmp-", ".trash-"))]
        return skip + [MARKER_NAME] if Path(folder) == source else skip

    shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True, copy_function=link_or_copy, ignore=ignored)


def stray_adapters(collection: Path, report: CompressionReport) -> list[str]:
    """Adapter folders the report does not list (left by a pre-lock `peft-jd add` that was interrupted)."""
    folder = collection / ADAPTERS_DIR
    names = [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")] if folder.is_dir() else []
    return sorted(set(names) - set(report.adapters))
