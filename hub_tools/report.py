"""The compression report as the Hub tools list it: a view of `peft_jd.compression.CompressionReport`, the one
reader of `report.json` (no key guessing here).

`read_report` (a local collection about to be pushed) refuses a `report.json` that is not a peft-jd compression
report, since push uploads it; `parse_report` (a report already on the Hub, for `peft-jd ls`) only warns.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from peft_jd.compression.report import CompressionReport
from peft_jd.core import REPORT_NAME, AdapterFormatError


logger = logging.getLogger(__name__)

__all__ = ["REPORT_NAME", "AdapterReport", "CollectionReport", "parse_report", "read_report", "view"]


@dataclass
class AdapterReport:
    """What the report says about one adapter.

    Args:
        name: Adapter name (its folder name under `adapters/`).
        cluster: Cluster id (int, or a per-module dict).
        figures: `mean_err2`, `mean_err`, `max_err2` (see `CompressionReport.adapter_figures`).
        failure: Always `None`: `compress` stops on a bad input instead of recording a failed adapter (kept for
            the listing's fields).
    """

    name: str
    cluster: Any = None
    figures: dict[str, float] = field(default_factory=dict)
    failure: Optional[str] = None


@dataclass
class CollectionReport:
    """Per-adapter entries plus the collection's figures (empty when there is no report)."""

    adapters: dict[str, AdapterReport] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    compression: Optional[CompressionReport] = None

    def failures(self) -> dict[str, str]:
        return {name: entry.failure for name, entry in self.adapters.items() if entry.failure}

    def mean_figures(self) -> dict[str, float]:
        return self.compression.mean_figures() if self.compression is not None else {}


def view(report: Optional[CompressionReport]) -> CollectionReport:
    """The Hub tools' view of a compression report (`None`: no report)."""
    if report is None:
        return CollectionReport()
    adapters = {name: AdapterReport(name, entry.get("cluster"), report.adapter_figures(name))
                for name, entry in report.adapters.items()}
    return CollectionReport(adapters, report.mean_figures(), report)


def parse_report(data: Any, source: str = REPORT_NAME) -> CollectionReport:
    """The view of a decoded remote report; one that is not a peft-jd compression report is ignored with a warning."""
    try:
        return view(CompressionReport.from_dict(data, source))
    except AdapterFormatError as exc:
        logger.warning("%s; listing without the compression report.", exc)
        return CollectionReport()


def read_report(path: str | os.PathLike) -> CollectionReport:
    """The view of a local `report.json` (empty if there is none); `AdapterFormatError` if it is not a report."""
    return view(CompressionReport.load_optional(path))
