"""The JD-LoRA update as one opaque custom op, so vLLM's torch.compile graphs call it at run time.

vLLM's CPU build traces the model once with dynamo (`DYNAMO_TRACE_ONCE`): Python code in a forward is run once at
trace time and its reads of global state are baked in. The per-step token slots therefore live behind
`torch.ops.vllm_jd.apply_`, which dynamo and inductor treat as a black box mutating the layer output.
"""

from __future__ import annotations

from typing import Optional

import torch

from .store import JDStore


__all__ = ["current_store", "install_jd_update", "set_current_store"]

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


def install_jd_update(layer: torch.nn.Module, layer_id: int) -> None:
    """Makes the linear layer `layer` add the JD-LoRA update of layer `layer_id` inside `quant_method.apply`.

    Every vLLM linear layer (and every LoRA wrapper of one) computes its local matmul as
    `layer.quant_method.apply(layer, x, bias)` — before a row-parallel layer's all-reduce and before a gathering
    column-parallel layer's all-gather, on the rank's input and output blocks. Adding the update there is right for
    every tensor-parallel layout: a row-parallel rank adds its partial update and the all-reduce sums them. The
    layer id is read from the `layer` argument, so a quant method shared by several layers serves each with its
    own id. Module tree and weights are left as they are (the wrapper is an attribute of the quant method).
    """
    layer._vllm_jd_layer_id = layer_id
    method = layer.quant_method
    if getattr(method, "_vllm_jd_wrapped", False):
        return
    inner = method.apply

    def apply(target: torch.nn.Module, x: torch.Tensor, *args, **kwargs):
        out = inner(target, x, *args, **kwargs)
        target_id = getattr(target, "_vllm_jd_layer_id", None)
        if target_id is not None:
            torch.ops.vllm_jd.apply_(out[0] if isinstance(out, tuple) else out, x, target_id)
        return out

    method.apply = apply
    method._vllm_jd_wrapped = True
