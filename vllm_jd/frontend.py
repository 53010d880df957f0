"""Front-end side (API server process): JD adapters ride on vLLM's LoRA requests, but never reach its LoRA slots.

`--lora-modules`, `/v1/load_lora_adapter`, the resolvers and `"model": "<adapter>"` all keep vLLM's own code. Two
engine methods are wrapped:

* `add_lora` (every load): a JD adapter is validated here, against its bases' config, and accepted without
  sending anything to the engine core: it takes no vLLM LoRA slot, and `--enable-lora` is only needed for plain LoRAs;
* `InputProcessor.process_inputs` (every request): a JD request goes on as a base-model request whose
  `SamplingParams.extra_args` names the adapter (the worker reads it to pick the Σ row) and whose `cache_salt` keeps
  its prefix-cache blocks apart from the base model's and other adapters'. The scheduler thus never counts JD
  adapters against `max_loras`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Optional

from peft_jd.core import BasesKey
from peft_jd.core.errors import BasesMismatchError, JDLoraError

from .adapters import JD_EXTRA_KEY, JDAdapterRef, bases_config_of, locate_jd_adapter, read_checked_sigmas


# Under the "vllm" logger, so that messages appear in vLLM's own log output.
logger = logging.getLogger(f"vllm.{__name__}")

__all__ = ["COLLECTIONS_ENV", "FrontendRegistry", "install_frontend_patches", "registry"]

# Collections (local roots or Hub repo ids, comma-separated) whose adapters are resolved by name at request time.
COLLECTIONS_ENV = "VLLM_JD_COLLECTIONS"


class FrontendRegistry:
    """The JD adapters this API process has accepted, by `(lora_int_id, lora_path)`."""

    def __init__(self):
        self._refs: dict[tuple[int, str], Optional[JDAdapterRef]] = {}
        self._bases_key: Optional[BasesKey] = None
        self._extra_collections: list[str] = []
        self._lock = threading.Lock()

    def collections(self) -> list[str]:
        """Collections searched by the resolver: `VLLM_JD_COLLECTIONS`, then those given as `--lora-modules` paths."""
        configured = [c.strip() for c in os.environ.get(COLLECTIONS_ENV, "").split(",") if c.strip()]
        return configured + [c for c in self._extra_collections if c not in configured]

    def inspect(self, lora_request) -> Optional[JDAdapterRef]:
        """The JD adapter of a `LoRARequest` (validated on first sight), or None for a plain LoRA.

        Raises the core's typed errors for a JD adapter that cannot be served; nothing is recorded then, so a fixed
        adapter can be loaded again.
        """
        if lora_request is None:
            return None
        cache_key = (lora_request.lora_int_id, lora_request.lora_path)
        with self._lock:
            if cache_key in self._refs:
                return self._refs[cache_key]
        ref = locate_jd_adapter(lora_request.lora_name, lora_request.lora_path, lora_request.lora_int_id)
        if ref is not None:
            self._check(ref)
            path = lora_request.lora_path
            if os.path.isdir(path) and os.path.abspath(path) != ref.directory:
                with self._lock:
                    if path not in self._extra_collections:
                        self._extra_collections.append(path)
        with self._lock:
            self._refs[cache_key] = ref
        return ref

    def _check(self, ref: JDAdapterRef) -> None:
        started = time.perf_counter()
        spec = ref.spec()
        key, config = bases_config_of(spec)
        with self._lock:
            if self._bases_key is not None and key != self._bases_key:
                raise BasesMismatchError(
                    f"adapter {ref.name!r} uses bases {key.describe()}, but this server already serves the JD "
                    f"collection with bases {self._bases_key.describe()}; start one server per collection."
                )
        read_checked_sigmas(spec, ref.directory, config, key.describe())
        with self._lock:
            self._bases_key = self._bases_key or key
        logger.info("JD-LoRA adapter %r accepted in %.1f ms (%s)", ref.name, 1e3 * (time.perf_counter() - started),
                    ref.directory)


_REGISTRY = FrontendRegistry()


def registry() -> FrontendRegistry:
    return _REGISTRY


def _salted(cache_salt: Optional[str], ref: JDAdapterRef) -> str:
    return f"{cache_salt or ''}|vllm-jd:{ref.key}"


def _wrap_process_inputs(original):
    def process_inputs(self, *args, **kwargs):
        ref = _REGISTRY.inspect(kwargs.get("lora_request"))
        if ref is None:
            return original(self, *args, **kwargs)
        kwargs["lora_request"] = None
        request = original(self, *args, **kwargs)
        params = request.sampling_params
        if params is None:
            raise JDLoraError(f"adapter {ref.name!r}: JD-LoRA adapters serve generation requests only.")
        params.extra_args = {**(params.extra_args or {}), JD_EXTRA_KEY: ref.to_extra()}
        request.cache_salt = _salted(request.cache_salt, ref)
        return request

    process_inputs._vllm_jd_wrapped = True
    return process_inputs


def _wrap_add_lora(original, is_async: bool):
    def accept(self, lora_request) -> bool:
        return _REGISTRY.inspect(lora_request) is not None

    if is_async:
        async def add_lora(self, lora_request) -> bool:
            if accept(self, lora_request):
                return True
            return await original(self, lora_request)
    else:
        def add_lora(self, lora_request) -> bool:
            if accept(self, lora_request):
                return True
            return original(self, lora_request)

    add_lora._vllm_jd_wrapped = True
    return add_lora


def install_frontend_patches() -> None:
    """Wraps the input processor and the engines' `add_lora` (idempotent)."""
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.llm_engine import LLMEngine

    if not getattr(InputProcessor.process_inputs, "_vllm_jd_wrapped", False):
        InputProcessor.process_inputs = _wrap_process_inputs(InputProcessor.process_inputs)
    for engine_cls, is_async in ((AsyncLLM, True), (LLMEngine, False)):
        if not getattr(engine_cls.add_lora, "_vllm_jd_wrapped", False):
            engine_cls.add_lora = _wrap_add_lora(engine_cls.add_lora, is_async)
