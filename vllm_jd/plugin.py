"""Entry point of the `vllm.general_plugins` group: run by vLLM in every process (API server, engine, workers)."""

from __future__ import annotations

import logging
import os


# Under the "vllm" logger, so that messages appear in vLLM's own log output.
logger = logging.getLogger(f"vllm.{__name__}")

__all__ = ["SUPPORTED_VLLM", "check_vllm_version", "register"]

# The vLLM releases this plugin was tested against (it wraps internals that move between releases).
SUPPORTED_VLLM = ((0, 32), (0, 33))
ALLOW_UNTESTED_ENV = "VLLM_JD_ALLOW_UNTESTED"

_registered = False


def _release(version: str) -> tuple[int, int]:
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_vllm_version(version: str) -> None:
    """Raises `RuntimeError` for a vLLM outside `SUPPORTED_VLLM` (unless `VLLM_JD_ALLOW_UNTESTED=1`)."""
    low, high = SUPPORTED_VLLM
    if low <= _release(version) < high:
        return
    message = (
        f"vllm_jd supports vLLM >= {low[0]}.{low[1]}, < {high[0]}.{high[1]} (it wraps vLLM internals that change "
        f"between releases); this is vLLM {version}. Install a supported vLLM (pip install 'peft-jd[vllm]'), or set "
        f"{ALLOW_UNTESTED_ENV}=1 to try anyway."
    )
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        logger.warning(message)
        return
    raise RuntimeError(message)


def register() -> None:
    """Installs the JD-LoRA path into vLLM (idempotent): front-end and worker wrappers, and the resolver."""
    global _registered
    if _registered:
        return
    import vllm

    check_vllm_version(vllm.__version__)
    from vllm.lora.resolver import LoRAResolverRegistry

    from . import ops  # noqa: F401  (registers torch.ops.vllm_jd.apply_)
    from .frontend import install_frontend_patches
    from .resolver import JDCollectionResolver
    from .vllm_fixes import install_cpu_lora_fix, install_cuda_graph_guard
    from .worker import install_worker_patches

    install_cpu_lora_fix()
    install_cuda_graph_guard()
    install_frontend_patches()
    install_worker_patches()
    LoRAResolverRegistry.register_resolver("JD-LoRA collections", JDCollectionResolver())
    _registered = True
    logger.info("vllm_jd plugin registered (vLLM %s)", vllm.__version__)
