"""The JD-LoRA update as one opaque custom op, so vLLM's torch.compile graphs call it at run time.

vLLM's CPU build traces the model once with dynamo (`DYNAMO_TRACE_ONCE`): Python code in a forward is run once at
trace time and its reads of global state are baked in. The per-step token slots therefore live behind
`torch.ops.vllm_jd.apply_`, which dynamo and inductor treat as a black box mutating the layer output.
"""

from __future__ import annotations

from typing import Optional

import torch

from .store import JDStore


__all__ = ["current_store", "set_current_store", "wrap_linear_forward"]

_STORE: Optional[JDStore] = None


def set_current_store(store: Optional[JDStore]) -> None:
    """Makes `store` the one the custom op reads (one per process: a worker serves one model)."""
    global _STORE
    _STORE = store


def current_store() -> Optional[JDStore]:
    return _STORE


@torch.library.custom_op("vllm_jd::apply_", mutates_args=("y",))
def _apply(y: torch.Tensor, x: torch.Tensor, layer_id: int) -> None:
    store = _STORE
    if store is not None:
        store.apply(y, x, layer_id)


@_apply.register_fake
def _apply_fake(y: torch.Tensor, x: torch.Tensor, layer_id: int) -> None:
    return None


def wrap_linear_forward(module: torch.nn.Module, layer_id: int) -> None:
    """Makes `module.forward` add the JD-LoRA update of layer `layer_id` to its output.

    vLLM's linear layers return `output` or `(output, output_bias)`; both are handled. The module tree and its
    weights are left as they are (the wrapper is an instance attribute, not a new module).
    """
    if getattr(module, "_vllm_jd_layer_id", None) is not None:
        return
    inner = module.forward

    def forward(x: torch.Tensor, *args, **kwargs):
        out = inner(x, *args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        torch.ops.vllm_jd.apply_(y, x, layer_id)
        return out

    module.forward = forward
    module._vllm_jd_layer_id = layer_id
