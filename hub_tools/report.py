"""Defensive reading of a compression `report.json`: per-adapter cluster, error figures and failures.

The report is written by the compression engine; its exact schema may evolve, so this reader accepts the shapes it
is likely to take (`{"adapters": {name: {...}}}`, `{"adapters": [{"name": ...}, ...]}`) and keeps what it understands:
numeric figures, a cluster id, and a failure message. Anything else is ignored, never fatal.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional


logger = logging.getLogger(__name__)

REPORT_NAME = "report.json"
_NAME_KEYS = ("name", "adapter", "adapter_name", "id")
_CLUSTER_KEYS = ("cluster", "clusters", "cluster_id")
_FAILURE_KEYS = ("error_message", "failure", "exception", "message")
_OK_STATUSES = ("ok", "success", "done", "compressed")


@dataclass
class AdapterReport:
    """What the report says about one adapter.

    Args:
        name: Adapter name (its folder name under `adapters/`).
        cluster: Cluster id (int, or a per-module dict), if reported.
        figures: Numeric figures (e.g. relative reconstruction errors), by the report's own key names.
        failure: Why compression failed for this adapter, if it did.
    """

    name: str
    cluster: Any = None
    figures: dict[str, float] = field(default_factory=dict)
    failure: Optional[str] = None


@dataclass
class CollectionReport:
    """Per-adapter entries plus the report's top-level numeric figures (empty when there is no report)."""

    adapters: dict[str, AdapterReport] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    raw: Optional[dict] = None

    def failures(self) -> dict[str, str]:
        return {name: entry.failure for name, entry in self.adapters.items() if entry.failure}

    def mean_figures(self) -> dict[str, float]:
        """Mean over adapters of every figure that all reporting adapters share."""
        keys = None
        for entry in self.adapters.values():
            if entry.figures:
                keys = set(entry.figures) if keys is None else keys & set(entry.figures)
        out = {}
        for key in sorted(keys or ()):
            values = [e.figures[key] for e in self.adapters.values() if key in e.figures]
            out[key] = sum(values) / len(values)
        return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numeric(data: dict, skip: tuple[str, ...] = ()) -> dict[str, float]:
    return {k: float(v) for k, v in data.items() if _is_number(v) and k not in skip}


def _entry(name: str, data: Any) -> AdapterReport:
    if not isinstance(data, dict):
        return AdapterReport(name, figures={"value": float(data)} if _is_number(data) else {})
    cluster = next((data[k] for k in _CLUSTER_KEYS if k in data), None)
    failure = data.get("error") if isinstance(data.get("error"), str) else None
    status = data.get("status")
    if failure is None and isinstance(status, str) and status.lower() not in _OK_STATUSES:
        failure = next((data[k] for k in _FAILURE_KEYS if isinstance(data.get(k), str)), status)
    nested = {k: v for k, v in data.items() if isinstance(v, dict) and k not in _CLUSTER_KEYS}
    figures = _numeric(data, skip=_CLUSTER_KEYS)
    for key, value in nested.items():  # e.g. {"errors": {"rel_error_mean": 0.3}}: flatten one level
        figures.update({f"{key}.{k}": v for k, v in _numeric(value).items()})
    return AdapterReport(name, cluster, figures, failure)


def parse_report(data: Any, source: str = REPORT_NAME) -> CollectionReport:
    """Builds a `CollectionReport` from the decoded JSON of a report; unknown shapes give an empty report."""
    if not isinstance(data, dict):
        logger.warning("%s: not a JSON object; ignoring the report.", source)
        return CollectionReport()
    container = data.get("adapters", data.get("per_adapter"))
    entries: dict[str, AdapterReport] = {}
    if isinstance(container, dict):
        entries = {str(name): _entry(str(name), value) for name, value in container.items()}
    elif isinstance(container, list):
        for item in container:
            name = next((item[k] for k in _NAME_KEYS if isinstance(item, dict) and isinstance(item.get(k), str)), None)
            if name is None:
                logger.warning("%s: adapter entry without a name ignored: %.80r", source, item)
                continue
            entries[name] = _entry(name, item)
    elif container is not None:
        logger.warning("%s: `adapters` is neither an object nor a list; ignoring it.", source)
    return CollectionReport(entries, _numeric(data), data)


def read_report(path: str | os.PathLike) -> CollectionReport:
    """Reads `report.json` if it exists; a missing or unreadable report gives an empty `CollectionReport`."""
    if not os.path.isfile(path):
        return CollectionReport()
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        logger.warning("%s is unreadable (%s); continuing without the compression report.", path, exc)
        return CollectionReport()
    return parse_report(data, str(path))
