"""Worker side: JD layers installed on the loaded model, Σ rows loaded on first use, token slots set every step.

Two `GPUModelRunner` methods are wrapped (vLLM's CPU runner inherits them):

* `load_model`: after vLLM (and its LoRA manager, when `--enable-lora`) built the model, every linear layer whose
  output comes from modules a JD collection can cover gets the JD update (`vllm_jd.ops`);
* `_prepare_inputs`: each step, the slot of every scheduled request is looked up from its
  `SamplingParams.extra_args` (set by the front end); an adapter seen for the first time is loaded then — a Σ read
  and one row write per module — and the slots are repeated over the request's tokens.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

import numpy as np
import torch

from peft_jd.core import BASE_SLOT, load_shared_bases

from .adapters import JD_EXTRA_KEY, JDAdapterRef, read_checked_sigmas
from .ops import install_jd_update, set_current_store
from .store import COLUMN, ROW, JDStore, LayerTarget


# Under the "vllm" logger, so that messages appear in vLLM's own log output.
logger = logging.getLogger(f"vllm.{__name__}")

__all__ = ["WorkerJD", "discover_layers", "install_worker_patches", "layer_target"]

# Σ rows allocated up front (grows by doubling past it).
INITIAL_SLOTS_ENV = "VLLM_JD_INITIAL_SLOTS"


def discover_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, LayerTarget]]:
    """The outermost linear layers of a vLLM model (LoRA wrappers included), with the bases keys of their parts.

    Returns `(name, base_layer, target)`: the wrapped vLLM linear layer (inside a LoRA wrapper, if any) and its
    `LayerTarget`, which records this rank's tensor-parallel share of it. A packed layer (`qkv_proj`, `gate_up_proj`,
    from the model's `packed_modules_mapping`) maps to the modules it packs, in the Hugging Face names the bases use
    (`…q_proj`, `…k_proj`, `…v_proj`).
    """
    from vllm.lora.layers import BaseLayerWithLoRA
    from vllm.model_executor.layers.linear import LinearBase

    packed = getattr(model, "packed_modules_mapping", None) or {}
    found, taken = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in taken):
            continue
        base = module.base_layer if isinstance(module, BaseLayerWithLoRA) else module
        if not isinstance(base, LinearBase):
            continue
        taken.append(name + ".")
        prefix, _, leaf = name.rpartition(".")
        parts = list(packed.get(leaf, [leaf]))
        sizes = list(getattr(base, "output_partition_sizes", None) or [])
        if len(sizes) != len(parts):
            if len(parts) != 1:
                logger.warning("JD-LoRA: layer %s packs %s but exposes sizes %s; not covered", name, parts, sizes)
                continue
            sizes = [getattr(base, "output_size_per_partition", None) or base.output_size]
        keys = tuple(f"{prefix}.{part}" if prefix else part for part in parts)
        target = layer_target(name, base, keys, tuple(int(s) for s in sizes))
        if target is not None:
            found.append((name, base, target))
    return found


def layer_target(name: str, base: torch.nn.Module, keys: tuple[str, ...],
                 sizes: tuple[int, ...]) -> Optional[LayerTarget]:
    """The `LayerTarget` of vLLM linear layer `base` on this rank (None, logged, for a layout it cannot shard).

    Row-parallel layers read input block `tp_rank` of `tp_size`; column-parallel layers write output block `tp_rank`
    of `tp_size` of every packed part, except the k and v parts of a `QKVParallelLinear` whose kv heads are
    replicated (fewer kv heads than ranks): `num_kv_head_replicas` consecutive ranks then hold the same kv head.
    """
    from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    tp_rank, tp_size = int(getattr(base, "tp_rank", 0)), int(getattr(base, "tp_size", 1))
    if isinstance(base, RowParallelLinear):
        return LayerTarget(name, keys, sizes, ROW, input_shard=(tp_rank, tp_size),
                           input_size=int(base.input_size_per_partition))
    input_size = int(getattr(base, "input_size_per_partition", None) or base.input_size)
    if tp_size == 1:
        return LayerTarget(name, keys, sizes, COLUMN, input_size=input_size)
    if isinstance(base, QKVParallelLinear) and len(keys) == 3:
        replicas = int(base.num_kv_head_replicas)
        kv = (tp_rank // replicas, tp_size // replicas)
        shards = ((tp_rank, tp_size), kv, kv)
    elif isinstance(base, ColumnParallelLinear) and not isinstance(base, QKVParallelLinear):
        shards = ((tp_rank, tp_size),) * len(keys)
    else:
        logger.warning("JD-LoRA: layer %s (%s, tensor parallel %d) has a layout the plugin does not shard; not "
                       "covered", name, type(base).__name__, tp_size)
        return None
    return LayerTarget(name, keys, sizes, COLUMN, output_shards=shards, input_size=input_size)


class WorkerJD:
    """The JD state of one model runner: its store and the slot of every request it has seen."""

    def __init__(self, store: JDStore):
        self.store = store
        self.request_slots: dict[str, int] = {}

    def slot_for(self, info: dict) -> int:
        """Slot of the adapter a request names, loading it on first use."""
        ref = JDAdapterRef.from_extra(info)
        slot = self.store.slot_of(ref.key)
        if slot is not None:
            return slot
        started = time.perf_counter()
        try:
            spec = ref.spec()
            bases = load_shared_bases(*spec.bases_reference(), expected_fingerprint=spec.bases_fingerprint,
                                      adapter_name=spec.name)
            self.store.attach_bases(bases)
            sigmas = read_checked_sigmas(spec, ref.directory, bases.config, bases.key.describe())
            clusters = {module_key: spec.cluster_of(module_key) for module_key in sigmas}
            slot = self.store.load(ref.key, sigmas, clusters, spec.scaling)
        except Exception:
            # The front end validated these files before accepting the adapter; they changed since. The step must go
            # on for the other requests: this one runs without its adapter, and the log says so loudly.
            logger.exception("JD-LoRA adapter %r could not be loaded in the worker; its requests run WITHOUT it",
                             ref.name)
            return BASE_SLOT
        logger.info("JD-LoRA adapter %r loaded into slot %d in %.1f ms", ref.name, slot,
                    1e3 * (time.perf_counter() - started))
        return slot

    def set_step(self, runner, num_scheduled_tokens: np.ndarray) -> None:
        """Sets the token slots of the step `runner._prepare_inputs` is preparing."""
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        slots = np.zeros(num_reqs, dtype=np.int64)
        for index, req_id in enumerate(batch.req_ids[:num_reqs]):
            slot = self.request_slots.get(req_id)
            if slot is None:
                slot = self._request_slot(runner, req_id)
                self.request_slots[req_id] = slot
            slots[index] = slot
        if len(self.request_slots) > 8 * max(num_reqs, 64):
            live = set(batch.req_ids[:num_reqs])
            self.request_slots = {k: v for k, v in self.request_slots.items() if k in live}
        if not slots.any():
            self.store.set_token_slots(None)
            return
        self.store.set_token_slots(torch.from_numpy(np.repeat(slots, num_scheduled_tokens[:num_reqs])))

    def _request_slot(self, runner, req_id: str) -> int:
        state = runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        info = extra.get(JD_EXTRA_KEY)
        return self.slot_for(info) if info else BASE_SLOT


def install(runner) -> Optional[WorkerJD]:
    """Installs the JD update on `runner.model` (this rank's share of every layer) and makes its store current.

    With tensor parallelism every rank runs this on its own model shard: its store holds its blocks of U and V and
    a full copy of the Σ rows, and each rank loads an adapter on its first request, like the others.
    """
    store = JDStore(int(os.environ.get(INITIAL_SLOTS_ENV, "256")), device=runner.device,
                    dtype=runner.model_config.dtype)
    for _, base, target in discover_layers(runner.model):
        install_jd_update(base, store.add_layer(target))
    set_current_store(store)
    # vLLM caches compiled graphs by a hash of its config: without this key, a graph compiled without the JD op (the
    # plugin absent) could be reused with it present, and JD rows would silently get the base model.
    if isinstance(runner.vllm_config.additional_config, dict):
        runner.vllm_config.additional_config["vllm_jd"] = f"jd-op-v2:{len(store.layers)}"
    logger.info("JD-LoRA: %d linear layers prepared for JD adapters (kernel backend %s)", len(store.layers),
                store.backend)
    return WorkerJD(store)


def install_worker_patches() -> None:
    """Wraps `GPUModelRunner.load_model` and `_prepare_inputs` (idempotent)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runners = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)
    except ImportError:  # builds without the CPU runner
        pass
    for cls in runners:
        if "load_model" in vars(cls) and not getattr(cls.load_model, "_vllm_jd_wrapped", False):
            cls.load_model = _wrap_load_model(cls.load_model)
    if not getattr(GPUModelRunner._prepare_inputs, "_vllm_jd_wrapped", False):
        GPUModelRunner._prepare_inputs = _wrap_prepare_inputs(GPUModelRunner._prepare_inputs)


def _wrap_load_model(original):
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        # A subclass's load_model may call its parent's: install once per model object.
        if getattr(self, "_vllm_jd_model", None) is not self.model:
            self._vllm_jd = install(self)
            self._vllm_jd_model = self.model
        return result

    load_model._vllm_jd_wrapped = True
    return load_model


def _wrap_prepare_inputs(original):
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        jd = getattr(self, "_vllm_jd", None)
        if jd is not None:
            jd.set_step(self, num_scheduled_tokens)
        return result

    _prepare_inputs._vllm_jd_wrapped = True
    return _prepare_inputs
