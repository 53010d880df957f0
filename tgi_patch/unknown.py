"""Reporting requests that name an adapter the server does not serve.

TGI maps a request's `adapter_id` with `ADAPTER_TO_INDEX.get(adapter_id, 0)`, so a typo silently runs the base
model. The patch installs a `CheckedAdapterIndex` as `ADAPTER_TO_INDEX`; its `get` raises (policy `"error"`) or logs
once per id (policy `"warn"`) for ids that are neither loaded nor an alias of the base model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

from peft_jd.core import UnknownAdapterError


class CheckedAdapterIndex(dict):
    """`dict` of adapter id → TGI adapter index whose `get` reports unknown ids.

    Args:
        mapping: TGI's adapter id → index.
        policy: `"error"` raises `peft_jd.core.UnknownAdapterError` (a `ValueError`: TGI fails that prefill batch and
            keeps serving); `"warn"` logs the first request for each unknown id and serves the base model.
        base_aliases: Ids that select the base model without a report (e.g. `""`, the model id).
        log: Callable taking a message, for the `"warn"` policy.
    """

    def __init__(self, mapping: Mapping[str, int], policy: str = "error", base_aliases: Iterable[str] = (),
                 log: Optional[Callable[[str], Any]] = None):
        super().__init__(mapping)
        self.policy = policy
        self.base_aliases = set(base_aliases)
        self.log = log or (lambda message: None)
        self.unknown_counts: dict[str, int] = {}

    def get(self, key: Any, default: Any = None) -> Any:
        if key in self:
            return self[key]
        if key is None or key in self.base_aliases:
            return default
        self.unknown_counts[key] = self.unknown_counts.get(key, 0) + 1
        message = (
            f"request names adapter {key!r}, which this server does not serve. Loaded adapters: {self._shown()}. "
            "Omit the adapter (or use the model id) for the base model."
        )
        if self.policy == "error":
            raise UnknownAdapterError(message)
        if self.unknown_counts[key] == 1:
            self.log(message + " Serving the base model (PEFT_JD_TGI_UNKNOWN_ADAPTER=warn).")
        return default

    def _shown(self) -> str:
        names = sorted(self)
        return ", ".join(names[:10]) + (f", … ({len(names)} in all)" if len(names) > 10 else "") if names else "none"
