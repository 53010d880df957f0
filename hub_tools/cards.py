"""Model cards of pushed repos: `peft_jd.compression.cards` (the one card generator), taking the Hub tools' report
view (`hub_tools.report.CollectionReport`) that `push` holds."""

from __future__ import annotations

from typing import Any, Optional

from peft_jd.compression import cards as _cards
from peft_jd.compression.cards import MAX_TABLE_ROWS, TAGS, human_size
from peft_jd.core import BasesConfig

from .report import AdapterReport, CollectionReport


__all__ = ["MAX_TABLE_ROWS", "TAGS", "collection_card", "human_size", "sigma_card"]


def sigma_card(
    name: str,
    repo_id: str,
    adapter_config: dict[str, Any],
    sigma_bytes: int,
    bases_config: BasesConfig,
    bases_repo: str,
    bases_revision: str,
    bases_subfolder: Optional[str] = None,
    report: Optional[AdapterReport] = None,
) -> str:
    """See `peft_jd.compression.cards.sigma_card`."""
    return _cards.sigma_card(name, repo_id, adapter_config, sigma_bytes, bases_config, bases_repo, bases_revision,
                             bases_subfolder, report.figures if report is not None else None)


def collection_card(
    title_repo: str,
    bases_config: BasesConfig,
    bases_bytes: int,
    bases_revision: str,
    adapters: dict[str, dict[str, Any]],
    report: CollectionReport,
    bases_folder: Optional[str] = None,
) -> str:
    """See `peft_jd.compression.cards.collection_card`."""
    return _cards.collection_card(title_repo, bases_config, bases_bytes, bases_revision, adapters,
                                  report.compression, bases_folder)
