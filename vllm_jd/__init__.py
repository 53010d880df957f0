"""Serve JD-LoRA collections with vLLM: shared bases resident once, every adapter a Σ row, no LoRA slot taken.

Loaded by vLLM through the `vllm.general_plugins` entry point (`vllm_jd.plugin:register`). Imports only the
PEFT-free core of peft-jd (`peft_jd.core`, `peft_jd.kernels`) and, lazily, vLLM itself. See docs/vllm.md.
"""

from .plugin import SUPPORTED_VLLM, check_vllm_version, register


__all__ = ["SUPPORTED_VLLM", "check_vllm_version", "register"]
