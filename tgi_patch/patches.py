"""The patches of TGI's adapter path (server code of text-generation-inference v3.3.7).

Each `patch_*` function receives the freshly imported TGI module (see `hooks.TGI_TARGETS`) and wraps one or two of
its functions; TGI's own behaviour is kept for everything that is not a JD adapter:

* `utils.adapter.load_module_map`: JD adapters (`peft_type == "JDLORA"`) are loaded by `loading.load_jd_module_map`.
* `adapters.lora.LoraWeights.prepare_weights`: JD configs go to `JDServingState.prepare` (bases once per shard,
  stacked Σ per layer, TP sharding).
* `adapters.weights.AdapterBatchData.from_meta`: plain LoRA batch data as TGI builds it, plus `jd_batches` with the
  per-token slots. (TGI's `LayerAdapterWeights.get_data` keeps one batch type per layer, so JD and LoRA adapters on
  the same layer are split before it runs.)
* `layers.lora.LoraLinear.forward_layer_type`: TGI's LoRA update, then the JD update.
* `models.globals.set_adapter_to_index`: unknown adapter ids are reported (`unknown.CheckedAdapterIndex`).
* `models.get_model_with_lora_adapters`: checks that every JD adapter the launcher listed is served as JD.
* `models.flash_causal_lm.FlashCausalLM`: decode CUDA graphs read the JD slots from static buffers.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
from typing import Any, Optional

from peft_jd.core import AdapterFormatError, JDLoraError, ShapeMismatchError, sigma_state_dict_key

from .forward import apply_jd
from .loading import JDAdapterConfig, is_jd_adapter, load_jd_module_map
from .settings import ShardSettings
from .state import JDAdapterWeights, JDBatchWeights, get_state
from .unknown import CheckedAdapterIndex
from .weights import COLUMN, ROW, TargetLayer


try:
    from loguru import logger as _loguru

    # TGI's shard logger only forwards records of `text_generation_server.*` modules to the launcher.
    logger = _loguru.patch(lambda record: record.update(name="text_generation_server.peft_jd"))
except ImportError:  # outside TGI's environment (unit tests of the patch functions)
    logger = logging.getLogger(__name__)
_IS_MASTER = os.environ.get("RANK", "0") == "0"

# Layer type → JD batch, set while FlashCausalLM captures a decode CUDA graph (the capture passes no adapter data).
_CAPTURE: contextvars.ContextVar[Optional[dict[str, JDBatchWeights]]] = contextvars.ContextVar("jd_capture",
                                                                                                default=None)
_SETTINGS: Optional[ShardSettings] = None
_REPORTED: set[str] = set()


def settings() -> ShardSettings:
    global _SETTINGS
    if _SETTINGS is None:
        _SETTINGS = ShardSettings.from_env()
    return _SETTINGS


def _patched(owner: Any, name: str) -> bool:
    return getattr(getattr(owner, name), "__peft_jd_patched__", False)


def _mark(function):
    function.__peft_jd_patched__ = True
    return function


# -------------------------------------------------------------------------------------------------------- loading
def patch_utils_adapter(module) -> None:
    if _patched(module, "load_module_map"):
        return
    original = module.load_module_map

    @_mark
    def load_module_map(model_id, revision, adapter_id, adapter_path, weight_names, trust_remote_code=False):
        if is_jd_adapter(adapter_id, adapter_path, revision):
            loaded = load_jd_module_map(adapter_id, adapter_path, revision, weight_names, model_id,
                                        settings().bases_override)
            get_state().expect(adapter_id, set(loaded[1].sigmas))
            return loaded
        return original(model_id, revision, adapter_id, adapter_path, weight_names, trust_remote_code)

    module.load_module_map = load_module_map


def _device_of(layer: Any):
    """Device of a TGI layer without a plain weight (quantized layers keep packed weights as parameters or buffers)."""
    for tensor in itertools.chain(layer.parameters(), layer.buffers()):
        return tensor.device
    raise ShapeMismatchError(f"cannot tell the device of TGI layer {type(layer).__name__}")


def describe_target(weight_name: str, layer: Any, layer_type: str, world_size: int) -> TargetLayer:
    """The `TargetLayer` of one TGI adapter layer, or an error when TGI's layer does not apply `layer_type`."""
    from text_generation_server.layers.lora import TensorParallelAdapterRowLinear, TensorParallelMultiAdapterLinear

    weight = getattr(getattr(getattr(layer, "base_layer", None), "linear", None), "weight", None)
    weight = weight if getattr(weight, "dim", lambda: 0)() == 2 else None
    device = weight.device if weight is not None else _device_of(layer)
    if isinstance(layer, TensorParallelAdapterRowLinear):
        if layer.layer_name != layer_type:
            raise AdapterFormatError(f"TGI's layer for {weight_name} applies {layer.layer_name!r} adapters.")
        in_full = weight.shape[1] * world_size if weight is not None else None
        return TargetLayer(weight_name, ROW, weight.shape[0] if weight is not None else None, in_full, device)
    if not isinstance(layer, TensorParallelMultiAdapterLinear):
        raise AdapterFormatError(
            f"{weight_name} is a {type(layer).__name__} in TGI; JD-LoRA is served on TGI's adapter linear layers only."
        )
    names = list(layer.layer_names or [])
    if layer_type not in names:
        raise AdapterFormatError(
            f"TGI's layer for {weight_name} applies adapters named {names}, not {layer_type!r}; this model cannot "
            "serve a JD adapter on that module."
        )
    if layer.sizes is not None:
        out_full = layer.sizes[names.index(layer_type)]
    elif world_size > 1:
        raise ShapeMismatchError(
            f"{weight_name}: TGI fuses this layer's outputs per shard in a layout JD-LoRA does not shard; serve this "
            "model with --num-shard 1."
        )
    else:
        out_full = weight.shape[0] if weight is not None else None
    return TargetLayer(weight_name, COLUMN, out_full, weight.shape[1] if weight is not None else None, device)


def _prepare_jd(config: JDAdapterConfig, layer_type: str, unused_weight_names: set, nlayers: int, dtype,
                world_size: int, process_group, target_to_layer: dict) -> Optional[JDAdapterWeights]:
    keys = [(layer_id, layer_type) for layer_id in range(nlayers)]
    if not any(target_to_layer.get(key, ("",))[0] in config.sigmas for key in keys):
        return None
    missing = [key for key in keys if key not in target_to_layer]
    if missing:
        raise AdapterFormatError(
            f"adapter {config.adapter_id!r} adapts {layer_type}, which this model lacks in layers "
            f"{[key[0] for key in missing][:8]}."
        )
    targets = [describe_target(*target_to_layer[key], layer_type, world_size) for key in keys]
    state = get_state()
    state.use_bases(config.bases, config.adapter_id)
    weights = state.prepare(config.adapter_id, config.sigmas, config.spec.cluster_of, layer_type, targets,
                            world_size, process_group.rank(), dtype)
    for target in targets:
        unused_weight_names.discard(sigma_state_dict_key(target.module_key))
    return weights


def patch_adapters_lora(module) -> None:
    if _patched(module.LoraWeights, "prepare_weights"):
        return
    original = module.LoraWeights.prepare_weights.__func__

    @_mark
    def prepare_weights(cls, config, module_map, layer_type, unused_weight_names, nlayers, dtype, world_size,
                        process_group, target_to_layer):
        if isinstance(config, JDAdapterConfig):
            return _prepare_jd(config, layer_type, unused_weight_names, nlayers, dtype, world_size, process_group,
                               target_to_layer)
        return original(cls, config, module_map, layer_type, unused_weight_names, nlayers, dtype, world_size,
                        process_group, target_to_layer)

    module.LoraWeights.prepare_weights = classmethod(prepare_weights)


def patch_models(module) -> None:
    if _patched(module, "get_model_with_lora_adapters"):
        return
    original = module.get_model_with_lora_adapters

    @_mark
    def get_model_with_lora_adapters(model_id, lora_adapters, *args, **kwargs):
        shard = settings()
        shard.base_aliases.add(model_id)
        model = original(model_id, lora_adapters, *args, **kwargs)
        state = get_state(create=False)
        served = state.served_adapters() if state is not None else set()
        missing = [name for name in shard.jd_adapters if name not in served]
        if missing:
            raise JDLoraError(
                f"JD-LoRA adapters {missing} were not loaded as JD adapters; check the shard log above for the cause."
            )
        if served:
            state.check_served()
            state.finish_loading()
            if _IS_MASTER:
                logger.info(
                    f"peft-jd: serving {len(served)} JD-LoRA adapter(s) from bases {state.bases_label} on layer types "
                    f"{sorted(state.layer_types)} ({state.nbytes() / 2**20:.1f} MiB of bases and Σ per shard)"
                )
        return model

    module.get_model_with_lora_adapters = get_model_with_lora_adapters


def patch_globals(module) -> None:
    if _patched(module, "set_adapter_to_index"):
        return
    original = module.set_adapter_to_index

    @_mark
    def set_adapter_to_index(adapter_to_index):
        shard = settings()
        original(CheckedAdapterIndex(adapter_to_index, shard.unknown_adapter, shard.base_aliases, log=logger.error))

    module.set_adapter_to_index = set_adapter_to_index


# -------------------------------------------------------------------------------------------------------- batches
def _split(layer_weights, layer_weights_cls) -> tuple[Any, Any]:
    """`(jd_layer, others)` of a `LayerAdapterWeights`: the JD layer weights (or None) and a `LayerAdapterWeights`
    with the other adapters (or None). Cached until an adapter is added or removed."""
    cached = layer_weights.__dict__.get("_jd_split")
    if cached is not None:
        return cached
    jd = {i: w for i, w in layer_weights.adapter_weights.items() if isinstance(w, JDAdapterWeights)}
    if not jd:
        split = (None, layer_weights)
    else:
        for index, weights in jd.items():
            weights.state.bind(index, weights.slot)
        others = layer_weights_cls()
        others.adapter_weights = {i: w for i, w in layer_weights.adapter_weights.items() if i not in jd}
        split = (next(iter(jd.values())), None if others.is_empty() else others)
    layer_weights._jd_split = split
    return split


def patch_adapters_weights(module) -> None:
    if _patched(module.AdapterBatchData, "from_meta"):
        return
    layer_weights_cls = module.LayerAdapterWeights
    original_add, original_remove = layer_weights_cls.add_adapter, layer_weights_cls.remove_adapter

    def add_adapter(self, adapter_idx, weights):
        original_add(self, adapter_idx, weights)
        self._jd_split = None

    def remove_adapter(self, adapter_idx):
        weights = self.adapter_weights.get(adapter_idx)
        original_remove(self, adapter_idx)
        if isinstance(weights, JDAdapterWeights):
            weights.state.unbind(adapter_idx)
        self._jd_split = None

    @_mark
    def from_meta(meta, weights, prefill, prefill_head_indices):
        data, jd_batches, slots = {}, {}, None
        for layer_type, layer_weights in weights.items():
            if layer_weights.is_empty():
                continue
            jd_weights, others = _split(layer_weights, layer_weights_cls)
            if others is not None:
                head_indices = prefill_head_indices if layer_type == "lm_head" else None
                data[layer_type] = others.get_data(meta, prefill, head_indices)
            if jd_weights is not None:
                if slots is None:
                    slots = jd_weights.state.token_slots(meta.adapter_indices)
                jd_batches[layer_type] = JDBatchWeights(jd_weights.layer, slots)
        batch = module.AdapterBatchData(meta=meta, data=data, prefill=prefill)
        batch.jd_batches = jd_batches
        return batch

    layer_weights_cls.add_adapter = add_adapter
    layer_weights_cls.remove_adapter = remove_adapter
    module.AdapterBatchData.from_meta = staticmethod(from_meta)


def patch_layers_lora(module) -> None:
    if _patched(module.LoraLinear, "forward_layer_type"):
        return
    original = module.LoraLinear.forward_layer_type

    @_mark
    def forward_layer_type(self, result, input, adapter_data, layer_type, start_idx, end_idx):
        result = original(self, result, input, adapter_data, layer_type, start_idx, end_idx)
        if adapter_data is not None:
            batch, graph_safe = getattr(adapter_data, "jd_batches", {}).get(layer_type), False
        else:
            capture = _CAPTURE.get()
            batch, graph_safe = (capture or {}).get(layer_type), True
        if batch is not None:
            output = result if batch.layer.parallel == ROW else result[:, start_idx:end_idx]
            apply_jd(batch, self.layer_id, input, output, self.process_group, graph_safe=graph_safe)
        return result

    module.LoraLinear.forward_layer_type = forward_layer_type


# ---------------------------------------------------------------------------------------------------- CUDA graphs
def fill_graph_slots(model: Any, adapter_data: Any, state: Any) -> Optional[int]:
    """Before a decode step, copies the batch's JD slots into the static buffer of the graph that will replay it.

    Returns the graph's batch size, or `None` when the step runs eagerly.
    """
    batches = getattr(adapter_data, "jd_batches", None) or {}
    if not batches:
        return None
    slots = next(iter(batches.values())).token_slots
    sizes = sorted(size for size in getattr(model, "cuda_graphs", {}) if size >= slots.shape[0])
    if not sizes:
        return None
    if sizes[0] not in state.graph_slots:
        raise RuntimeError(f"the CUDA graph for batch size {sizes[0]} was captured without JD-LoRA slot buffers")
    state.fill_graph_buffer(sizes[0], slots)
    meta = adapter_data.meta
    lora_in_batch = any(index and index not in state.slot_of_index for index in meta.adapter_set)
    if lora_in_batch and "lora-graphs" not in _REPORTED:
        _REPORTED.add("lora-graphs")
        logger.error("plain LoRA adapters are not applied in TGI's CUDA-graph decode; run with --cuda-graphs 0")
    return sizes[0]


def patch_flash_causal_lm(module) -> None:
    cls = module.FlashCausalLM
    if _patched(cls, "forward"):
        return
    original_warmup, original_forward = cls.cuda_graph_warmup, cls.forward

    def cuda_graph_warmup(self, bs, max_s, max_bt):
        state = get_state(create=False)
        if state is None or not state.layer_types:
            return original_warmup(self, bs, max_s, max_bt)
        token = _CAPTURE.set(state.batches(state.graph_buffer(bs, self.device)))
        try:
            return original_warmup(self, bs, max_s, max_bt)
        finally:
            _CAPTURE.reset(token)

    @_mark
    def forward(self, batch, adapter_data):
        state = get_state(create=False)
        if state is not None and state.graph_slots and batch.cu_seqlen_prefill is None:
            fill_graph_slots(self, adapter_data, state)
        return original_forward(self, batch, adapter_data)

    cls.cuda_graph_warmup = cuda_graph_warmup
    cls.forward = forward
