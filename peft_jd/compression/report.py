"""`report.json` of a compressed collection and the Python object returned by `compress` / `extend_collection`."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


REPORT_NAME = "report.json"
REPORT_FORMAT = "peft-jd-compression-report"
ERROR_CONVENTION = (
    "err2 = (||dW - dW_hat||_F / ||dW||_F)^2 per adapter and module (the paper's convention), err = its square root; "
    "means are over adapters and modules"
)


def default_mode(directory: bool = False) -> int:
    """Permissions a plain `open`/`mkdir` would give (temporary files and folders are private by default)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Writes JSON through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=False)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class CompressionReport:
    """Everything `report.json` records: settings, per adapter and module errors and clusters, sizes, timings.

    Args:
        data: The JSON content (see `docs/compression.md` for the fields).
        path: Where it was read from or written to.
    """

    data: dict[str, Any]
    path: Path | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> CompressionReport:
        """Reads `report.json` from a file or a collection folder."""
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; is this a collection written by `peft-jd compress`?")
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != REPORT_FORMAT:
            raise ValueError(f"{path} is not a peft-jd compression report.")
        return cls(data=data, path=path)

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Writes the report atomically (to `path`, or where it came from)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("no path to save the report to.")
        write_json_atomic(target, self.data)
        self.path = target
        return target

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
        """Per adapter: source, cluster(s), `err2`/`err` per module, means, sizes."""
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
        return self.data["timings"]

    @property
    def warnings(self) -> list[str]:
        return self.data.setdefault("warnings", [])

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
        if "total_s" in self.timings:
            text += f"; {self.timings['total_s']:.1f} s"
        return text + "."

    def __repr__(self) -> str:
        return f"CompressionReport({self.summary()})"


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
                  sigma_params: int, added: bool = False) -> dict[str, Any]:
    """The report entry of one adapter."""
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
        "added": added,
        "err2": errors2,
        "err": {key: value**0.5 for key, value in errors2.items()},
    }
