"""Environment variables shared by `jd-text-generation-launcher` (which sets them) and the patched TGI shards."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field


ENABLE_ENV = "PEFT_JD_TGI"
ADAPTERS_ENV = "PEFT_JD_TGI_ADAPTERS"
BASES_ENV = "PEFT_JD_TGI_BASES"
UNKNOWN_ADAPTER_ENV = "PEFT_JD_TGI_UNKNOWN_ADAPTER"
BASE_ALIASES_ENV = "PEFT_JD_TGI_BASE_ALIASES"

UNKNOWN_ADAPTER_POLICIES = ("error", "warn")
# Request adapter ids that TGI itself treats as "no adapter": unset field, TGI's merge sentinel, OpenAI's default.
BUILTIN_BASE_ALIASES = frozenset({"", "__base_model__", "tgi"})


def split_names(value: str | None) -> list[str]:
    """Comma-separated list → stripped, non-empty names."""
    return [part.strip() for part in (value or "").split(",") if part.strip()]


@dataclass
class ShardSettings:
    """What a patched shard reads from its environment.

    Args:
        enabled: The launcher asked for the patch (`PEFT_JD_TGI=1`).
        jd_adapters: Ids of the JD adapters the launcher validated; each must be served as JD, never as plain LoRA.
        bases_override: Local bases directory replacing the `bases` reference of every JD adapter.
        unknown_adapter: `"error"` (fail requests naming an adapter that is not loaded) or `"warn"` (log, serve base).
        base_aliases: Request adapter ids that mean "base model" (the model id is added when the model loads).
    """

    enabled: bool = False
    jd_adapters: list[str] = field(default_factory=list)
    bases_override: str | None = None
    unknown_adapter: str = "error"
    base_aliases: set[str] = field(default_factory=lambda: set(BUILTIN_BASE_ALIASES))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ShardSettings:
        environ = os.environ if environ is None else environ
        policy = environ.get(UNKNOWN_ADAPTER_ENV, "error").strip().lower() or "error"
        if policy not in UNKNOWN_ADAPTER_POLICIES:
            raise ValueError(f"{UNKNOWN_ADAPTER_ENV}={policy!r}; choose one of {UNKNOWN_ADAPTER_POLICIES}.")
        return cls(
            enabled=environ.get(ENABLE_ENV, "") == "1",
            jd_adapters=split_names(environ.get(ADAPTERS_ENV)),
            bases_override=environ.get(BASES_ENV) or None,
            unknown_adapter=policy,
            base_aliases=set(BUILTIN_BASE_ALIASES) | set(split_names(environ.get(BASE_ALIASES_ENV))),
        )
