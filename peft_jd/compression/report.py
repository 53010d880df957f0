"""`report.json` of a collection: its one reader and writer (`compress`, `add`, `inspect`, Hub cards and listings).

The report is JSON (no tensors), so reading it needs neither torch nor peft beyond what the package already imports.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..core import REPORT_NAME, AdapterFormatError, atomic_write_json, read_json_object
from .sizes import REFERENCE_BYTES, dtype_bytes


REPORT_FORMAT = "peft-jd-compression-report"
REPORT_FORMAT_VERSION = 1
ERROR_CONVENTION = (
    "err2 = (||dW - dW_hat||_F / ||dW||_F)^2 per adapter and module (the paper's convention), err = its square root; "
    "means are over adapters and modules"
)
# Per adapter figures shown by cards and `peft-jd ls`, in this order.
FIGURE_KEYS = ("mean_err2", "mean_err", "max_err2")
# Sections every report has; `from_dict` refuses a file without them (it would fail later, less clearly).
_REQUIRED = {"settings": dict, "summary": dict, "sizes": dict, "modules": dict, "adapters": dict}


@dataclass
class CompressionReport:
    """Everything `report.json` records: settings, per adapter and module errors and clusters, sizes, timings.

    Args:
        data: The JSON content (see `docs/compression.md` for the fields).
        path: Where it was read from or written to.
    """

    data: dict[str, Any]
    path: Optional[Path] = None

    # ------------------------------------------------------------------------------------------- read / write
    @classmethod
    def from_dict(cls, data: Any, source: str = REPORT_NAME) -> CompressionReport:
        """Checks that `data` is a peft-jd compression report; `AdapterFormatError` naming `source` otherwise."""
        fix = "it was not written by `peft-jd compress`; delete it or rerun `peft-jd compress`."
        if not isinstance(data, dict):
            raise AdapterFormatError(f"{source} must hold a JSON object, not {type(data).__name__}; {fix}")
        if data.get("format") != REPORT_FORMAT:
            raise AdapterFormatError(f"{source} is not a peft-jd compression report (no \"format\": "
                                     f"\"{REPORT_FORMAT}\"); {fix}")
        version = data.get("format_version", REPORT_FORMAT_VERSION)
        if not isinstance(version, int) or version > REPORT_FORMAT_VERSION:
            raise AdapterFormatError(f"{source}: report format version {version!r} is newer than this peft-jd "
                                     "understands; upgrade peft-jd.")
        for key, kind in _REQUIRED.items():
            if not isinstance(data.get(key), kind):
                raise AdapterFormatError(f"{source}: `{key}` is missing or not a JSON {kind.__name__}; {fix}")
        for name, entry in data["adapters"].items():
            if not isinstance(entry, dict) or not isinstance(entry.get("err2"), dict):
                raise AdapterFormatError(f"{source}: the entry of adapter {name!r} is malformed; {fix}")
        return cls(data=data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CompressionReport:
        """Reads `report.json` from a file or a collection folder (`AdapterFormatError` if missing or malformed)."""
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_NAME
        report = cls.from_dict(read_json_object(path, "compression report"), source=str(path))
        report.path = path
        return report

    @classmethod
    def load_optional(cls, path: str | os.PathLike) -> Optional[CompressionReport]:
        """Like `load`, but `None` when there is no report (a collection may be pushed without one)."""
        path = Path(path)
        file = path / REPORT_NAME if path.is_dir() else path
        return cls.load(file) if file.is_file() else None

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Writes the report atomically (to `path`, or where it came from)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("no path to save the report to.")
        atomic_write_json(target, self.data)
        self.path = target
        return target

    @classmethod
    def build(
        cls,
        settings: dict[str, Any],
        base_model_name_or_path: Optional[str],
        target_modules: list[str],
        task_type: Optional[str],
        modules: dict[str, dict[str, Any]],
        adapters: dict[str, dict[str, Any]],
        bases_params: int,
        sigma_size: int,
        auto_selection: Optional[dict[str, Any]] = None,
    ) -> CompressionReport:
        """A new report of a collection (entries from `adapter_entry`, modules as `compress` records them)."""
        report = cls(data={
            "format": REPORT_FORMAT,
            "format_version": REPORT_FORMAT_VERSION,
            "error_convention": ERROR_CONVENTION,
            "settings": settings,
            "base_model_name_or_path": base_model_name_or_path,
            "target_modules": target_modules,
            "task_type": task_type,
            "num_modules": len(modules),
            "auto_selection": auto_selection,
            "modules": modules,
            "adapters": adapters,
            "warnings": [],
            "timings": {},
        })
        report.refresh(bases_params, sigma_size)
        return report

    def refresh(self, bases_params: int, sigma_size: int) -> None:
        """Recomputes the adapter count, error summary and sizes from the adapter entries."""
        entries = self.adapters
        self.data["num_adapters"] = len(entries)
        self.data["summary"] = summarize(entries)
        self.data["sizes"] = sizes_entry(
            sum(e["lora_params"] for e in entries.values()), bases_params,
            sum(e["sigma_params"] for e in entries.values()), sigma_size,
            saved_params=sum(e.get("saved_params", 0) for e in entries.values()),
        )
        self.data["sizes"]["bytes"] = bytes_entry(self.data["sizes"], len(entries), self.data["settings"])

    # ---------------------------------------------------------------------------------------------- accessors
    @property
    def method(self) -> str:
        return self.data["settings"]["method"]

    @property
    def rank(self) -> int:
        return self.data["settings"]["rank"]

    @property
    def clusters(self) -> int:
        return self.data["settings"]["clusters"]

    @property
    def adapters(self) -> dict[str, dict[str, Any]]:
        """Per adapter: source, cluster(s), `err2`/`err` per module, means, sizes, whether it was `added`."""
        return self.data["adapters"]

    @property
    def modules(self) -> dict[str, dict[str, Any]]:
        """Per module: shapes, clusters, iterations, timings, mean error."""
        return self.data["modules"]

    @property
    def mean_err2(self) -> float:
        """Mean over adapters and modules of `(‖ΔW−ΔŴ‖/‖ΔW‖)²`."""
        return self.data["summary"]["mean_err2"]

    @property
    def mean_err(self) -> float:
        return self.data["summary"]["mean_err"]

    @property
    def sizes(self) -> dict[str, Any]:
        return self.data["sizes"]

    @property
    def timings(self) -> dict[str, Any]:
        return self.data.setdefault("timings", {})

    @property
    def warnings(self) -> list[str]:
        return self.data.setdefault("warnings", [])

    def added_adapters(self) -> list[str]:
        """Adapters projected onto the bases by `peft-jd add` (not part of the joint compression)."""
        return sorted(name for name, entry in self.adapters.items() if entry.get("added"))

    def adapter_figures(self, name: str) -> dict[str, float]:
        """The figures cards and listings show for adapter `name` (empty if the report does not list it)."""
        return report_figures(self.adapters.get(name, {}))

    def mean_figures(self) -> dict[str, float]:
        """Collection-level figures: mean err² and err over adapters and modules, worst adapter's mean err²."""
        summary = self.data["summary"]
        return {"mean_err2": summary["mean_err2"], "mean_err": summary["mean_err"],
                "max_adapter_err2": summary["max_adapter_err2"]}

    def summary(self) -> str:
        """One paragraph for humans."""
        s, sizes = self.data["settings"], self.sizes
        clusters = "" if s["method"] == "svd" else f", {s['clusters']} cluster(s)"
        text = (
            f"{len(self.adapters)} adapters × {len(self.modules)} modules, {s['method']} rank {s['rank']}"
            f"{clusters}: mean err² {self.mean_err2:.4g} "
            f"(err {self.mean_err:.4g}), max adapter err² {self.data['summary']['max_adapter_err2']:.4g}; "
            f"{sizes['lora_params']:,} LoRA parameters → {sizes['bases_params']:,} shared + "
            f"{sizes['sigma_params']:,} Σ (ratio {sizes['compression_ratio']:.2f}×)"
        )
        if "bytes" in sizes:
            memory = sizes["bytes"]
            text += (f"; {memory['bytes_per_adapter']:,.0f} bytes per adapter with the bases amortised, "
                     f"{memory['memory_ratio']:.1f}× less than the LoRAs at fp16")
        if sizes.get("saved_params"):
            text += f"; {sizes['saved_params']:,} modules_to_save parameters kept uncompressed"
        if "total_s" in self.timings:
            text += f"; {self.timings['total_s']:.1f} s"
        return text + "."

    def __repr__(self) -> str:
        return f"CompressionReport({self.summary()})"


def report_figures(entry: Mapping[str, Any]) -> dict[str, float]:
    """The figures of one adapter entry (`mean_err2`, `mean_err`, `max_err2`) that it holds."""
    return {key: float(entry[key]) for key in FIGURE_KEYS if isinstance(entry.get(key), (int, float))}


def summarize(adapters: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Collection-level error means from the per-adapter entries."""
    err2 = [e for entry in adapters.values() for e in entry["err2"].values()]
    err = [e for entry in adapters.values() for e in entry["err"].values()]
    per_adapter = [entry["mean_err2"] for entry in adapters.values()]
    return {
        "mean_err2": sum(err2) / max(1, len(err2)),
        "mean_err": sum(err) / max(1, len(err)),
        "max_err2": max(err2, default=0.0),
        "max_adapter_err2": max(per_adapter, default=0.0),
    }


def adapter_entry(source: str, errors2: dict[str, float], clusters: dict[str, int], lora_params: int,
                  sigma_params: int, added: bool = False, saved_params: int = 0) -> dict[str, Any]:
    """The report entry of one adapter.

    Args:
        source: The spec the adapter was given as.
        errors2: Squared relative error per module.
        clusters: Cluster per module.
        lora_params: LoRA factor parameters of the input.
        sigma_params: Σ parameters of the output.
        added: Written by `peft-jd add` (projected onto existing bases).
        saved_params: Parameters of its `modules_to_save`, kept uncompressed in its sigma adapter.
    """
    values = list(errors2.values())
    cluster_ids = set(clusters.values())
    return {
        "source": source,
        "cluster": next(iter(cluster_ids)) if len(cluster_ids) == 1 else clusters,
        "mean_err2": sum(values) / max(1, len(values)),
        "mean_err": sum(v**0.5 for v in values) / max(1, len(values)),
        "max_err2": max(values, default=0.0),
        "lora_params": lora_params,
        "sigma_params": sigma_params,
        "saved_params": saved_params,
        "added": added,
        "err2": errors2,
        "err": {key: value**0.5 for key, value in errors2.items()},
    }


def bytes_entry(sizes: Mapping[str, Any], num_adapters: int, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Bytes of a collection as stored (Σ and bases in their storage dtypes), against its LoRAs at fp16; the bases
    are amortised over the adapters in the per-adapter figures. `modules_to_save` count 2 bytes per value on both
    sides."""
    sigma = sizes["sigma_params"] * dtype_bytes(settings.get("sigma_dtype", "float32"))
    bases = sizes["bases_params"] * dtype_bytes(settings.get("bases_dtype", "float32"))
    saved = sizes.get("saved_params", 0) * REFERENCE_BYTES
    lora = sizes["lora_params"] * REFERENCE_BYTES
    n = max(1, num_adapters)
    return {
        "lora_fp16_bytes": lora,
        "bases_bytes": bases,
        "sigma_bytes": sigma,
        "saved_bytes": saved,
        "lora_bytes_per_adapter": lora / n,
        "bytes_per_adapter": (sigma + bases + saved) / n,
        "memory_ratio": lora / max(1, sigma + bases),
        "total_memory_ratio": (lora + saved) / max(1, sigma + bases + saved),
    }


def sizes_entry(lora_params: int, bases_params: int, sigma_params: int, sigma_size: int,
                saved_params: int = 0) -> dict[str, Any]:
    """Parameter counts of a collection; `compression_ratio` compares the LoRA factors with bases + Σ, and
    `total_ratio` includes the `modules_to_save` parameters, stored uncompressed on both sides."""
    return {
        "lora_params": lora_params,
        "bases_params": bases_params,
        "sigma_params": sigma_params,
        "saved_params": saved_params,
        "sigma_params_per_module": sigma_size,
        "compression_ratio": lora_params / max(1, bases_params + sigma_params),
        "total_ratio": (lora_params + saved_params) / max(1, bases_params + sigma_params + saved_params),
    }
