"""Runtime resolution: an unknown `"model"` name is looked up in the configured JD collections."""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from peft_jd.core.errors import JDLoraError

from .adapters import locate_jd_adapter
from .frontend import registry


# Under the "vllm" logger, so that messages appear in vLLM's own log output.
logger = logging.getLogger(f"vllm.{__name__}")

__all__ = ["JDCollectionResolver"]


class JDCollectionResolver(LoRAResolver):
    """Finds adapter `name` in the collections of `VLLM_JD_COLLECTIONS` (and those given to `--lora-modules`).

    vLLM calls it only when `VLLM_ALLOW_RUNTIME_LORA_UPDATING=true`; the request that named the adapter is then
    served by it (vLLM's `add_lora`, wrapped by the plugin, validates and accepts it first).
    """

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Optional[LoRARequest]:
        for collection in registry().collections():
            try:
                # Hub look-ups block: keep them off the event loop.
                ref = await asyncio.to_thread(locate_jd_adapter, lora_name, collection, 0, True)
            except JDLoraError as exc:
                logger.debug("JD-LoRA resolver: %s", exc)
                continue
            if ref is not None:
                path = ref.directory if ref.hub_repo is None else collection
                # vLLM replaces lora_int_id with its own counter before loading.
                return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=path)
        return None
