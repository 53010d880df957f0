"""JD-LoRA layers: a per-adapter Σ between bases U, V that are shared by all adapters of a collection.

Adapters reach a layer already validated (`peft_jd.core.validate_against_bases`, called by `JDLoraModel`); a layer
checks only what it alone knows: that the bases fit its base layer's in/out features.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch import nn

from ..core import BasesMismatchError, ShapeMismatchError
from ..kernels import jd_lora_apply, select_backend
from .slots import SlotTable


# Σ dtypes a layer may follow from its base layer; anything else (quantized, float8) keeps fp32, as PEFT's LoRA does.
_SIGMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


class JDLoraLayer(BaseTunerLayer):
    """Holds, for one target module, the shared bases and every loaded adapter's Σ.

    Per adapter, `jd_sigma[name]` is an `nn.Parameter` that is a *view* of one row of `jd_sigma_stack`, the stacked Σ
    of all adapters used by mixed batches; so training, `load_state_dict` and the batched kernel all see one copy.
    """

    adapter_layer_names = ("jd_sigma",)
    other_param_names = ("jd_cluster", "jd_scaling")

    def __init__(self, base_layer: nn.Module, slot_table: SlotTable, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer())
        self.jd_sigma = nn.ParameterDict({})
        self.jd_cluster: dict[str, int] = {}
        self.jd_scaling: dict[str, float] = {}
        self._uniform_scaling: float | bool | None = None
        self.slot_table = slot_table
        self.sigma_type: Optional[str] = None
        self.bases_id: Optional[str] = None
        # "torch" or "triton", resolved once when the bases are attached and again when the layer changes device.
        self.kernel_backend: Optional[str] = None
        self._disable_adapters = False
        self.merged_adapters = []
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"Unsupported layer type {type(self.get_base_layer())}")
        self.in_features = in_features
        self.out_features = out_features
        self.kwargs = kwargs

    # --------------------------------------------------------------------------------------------- bases, dtypes
    def bases_placement(self) -> tuple[torch.dtype, torch.device]:
        """dtype/device the bases should have here: the base layer's half precision if any (fast GEMMs), else fp32."""
        base_layer = self.get_base_layer()
        weight = getattr(base_layer, "weight", None)
        device = weight.device if weight is not None else torch.device("cpu")
        dtype = getattr(base_layer, "compute_dtype", None) if self.quantization_backend is not None else None
        if dtype is None and weight is not None and weight.dtype in (torch.float16, torch.bfloat16, torch.float64):
            dtype = weight.dtype
        return dtype or torch.float32, device

    def sigma_dtype(self, autocast_adapter_dtype: bool = True) -> torch.dtype:
        """dtype of Σ here, by PEFT's rule for adapter weights: the base weight's float dtype (fp32 for quantized
        weights), upcast from fp16/bf16 to fp32 when `autocast_adapter_dtype` (PEFT's default)."""
        weight = getattr(self.get_base_layer(), "weight", None)
        dtype = weight.dtype if weight is not None and weight.dtype in _SIGMA_DTYPES else torch.float32
        return torch.float32 if autocast_adapter_dtype and dtype in _HALF_DTYPES else dtype

    def attach_bases(self, shared, module_key: str) -> None:
        """Attaches this module's bases from a `SharedBases`, placed for this layer."""
        U, V = shared.module(module_key, *self.bases_placement())
        self.set_bases(U, V, shared.key.describe(), module_key)

    def set_bases(self, U: torch.Tensor, V: torch.Tensor, bases_id: str, module_key: str) -> None:
        """Attaches the shared bases of this module (no copy) after checking shapes against the base layer."""
        if U.dim() != 3 or V.dim() != 3 or U.shape[0] != V.shape[0] or U.shape[2] != V.shape[2]:
            raise ShapeMismatchError(f"bases of {module_key}: malformed U {tuple(U.shape)} / V {tuple(V.shape)}.")
        if U.shape[1] != self.out_features or V.shape[1] != self.in_features:
            raise ShapeMismatchError(
                f"bases of module {module_key} are for a {V.shape[1]}→{U.shape[1]} layer, but the base model's is "
                f"{self.in_features}→{self.out_features}. The collection was compressed for another base model."
            )
        if self.bases_id is not None:
            if self.bases_id != bases_id:
                raise BasesMismatchError(f"module {module_key} already uses bases {self.bases_id}, not {bases_id}.")
            return
        self.register_buffer("jd_U", U, persistent=False)
        self.register_buffer("jd_V", V, persistent=False)
        self.bases_id = bases_id
        self.kernel_backend = select_backend(U.device)

    def _ensure_stack(self, sigma_type: str) -> None:
        capacity = self.slot_table.capacity
        rank = self.jd_U.shape[-1]
        shape = (capacity, rank, rank) if sigma_type == "full" else (capacity, rank)
        stack = getattr(self, "jd_sigma_stack", None)
        if stack is not None and stack.shape[0] >= capacity:
            return
        dtype = self.sigma_dtype() if stack is None else stack.dtype
        new_stack = torch.zeros(shape, dtype=dtype, device=self.jd_U.device)
        new_cluster = torch.zeros(capacity, dtype=torch.long, device=self.jd_U.device)
        new_scaling = torch.zeros(capacity, dtype=dtype, device=self.jd_U.device)
        if stack is not None:
            new_stack[: stack.shape[0]] = stack
            new_cluster[: stack.shape[0]] = self.jd_slot_cluster
            new_scaling[: stack.shape[0]] = self.jd_slot_scaling
        self._set_stack(new_stack, new_cluster, new_scaling)

    def _set_stack(self, stack: torch.Tensor, cluster: torch.Tensor, scaling: torch.Tensor) -> None:
        self.register_buffer("jd_sigma_stack", stack, persistent=False)
        self.register_buffer("jd_slot_cluster", cluster, persistent=False)
        self.register_buffer("jd_slot_scaling", scaling, persistent=False)
        self._rebind_sigma_views()

    def cast_sigmas(self, dtype: torch.dtype) -> None:
        """Gives the Σ of every adapter of this layer `dtype` (they share one stacked tensor, hence one dtype)."""
        stack = getattr(self, "jd_sigma_stack", None)
        if stack is None or stack.dtype == dtype:
            return
        self._set_stack(stack.to(dtype), self.jd_slot_cluster, self.jd_slot_scaling.to(dtype))

    def _rebind_sigma_views(self) -> None:
        """Points every adapter's Σ parameter at its row of the stack (after growth or a device/dtype move)."""
        for adapter_name, param in self.jd_sigma.items():
            row = self.jd_sigma_stack[self.slot_table.slot_of[adapter_name]]
            if param.data_ptr() != row.data_ptr() or param.dtype != row.dtype:
                row.copy_(param.data)
                param.data = row

    def _apply(self, fn, recurse: bool = True):
        module = nn.Module._apply(self, fn, recurse)
        if getattr(self, "jd_sigma_stack", None) is not None:
            self._rebind_sigma_views()
        if getattr(self, "jd_U", None) is not None:
            self.kernel_backend = select_backend(self.jd_U.device)
        return module

    # ----------------------------------------------------------------------------------------------- adapter state
    def update_layer(
        self,
        adapter_name: str,
        sigma_type: str,
        cluster: int,
        scaling: float,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Adds (or resets) an adapter with a zero Σ: a no-op until trained or loaded (PEFT's injection path).

        Args:
            adapter_name: Name of the adapter.
            sigma_type: `"full"` or `"diag"`.
            cluster: Cluster of the adapter for this module (index into the bases' first dimension).
            scaling: Multiplier of the update.
            inference_mode: Freeze Σ.
        """
        self.write_sigmas([adapter_name], [None], [cluster], [scaling], sigma_type, inference_mode)

    def write_sigmas(
        self,
        adapter_names: Sequence[str],
        sigmas: Sequence[Optional[torch.Tensor]],
        clusters: Sequence[int],
        scalings: Sequence[float],
        sigma_type: str,
        inference_mode: bool = False,
    ) -> None:
        """Writes many adapters' Σ with one indexed copy into the stack. The caller has validated them.

        Args:
            adapter_names: Names of the adapters.
            sigmas: Their Σ (`None` for zeros).
            clusters: Their cluster for this module.
            scalings: Their scaling.
            sigma_type: `"full"` or `"diag"`.
            inference_mode: Freeze Σ.
        """
        self.sigma_type = sigma_type
        slots = [self.slot_table.acquire(name) for name in adapter_names]
        self._ensure_stack(sigma_type)
        stack = self.jd_sigma_stack
        index = torch.tensor(slots, dtype=torch.long, device=stack.device)
        with torch.no_grad():
            rows = [torch.zeros(stack.shape[1:]) if sigma is None else sigma for sigma in sigmas]
            stack.index_copy_(0, index, torch.stack(rows).to(stack))
            self.jd_slot_cluster.index_copy_(0, index, torch.tensor(list(clusters), device=stack.device))
            scaling_rows = torch.tensor(list(scalings), dtype=stack.dtype, device=stack.device)
            self.jd_slot_scaling.index_copy_(0, index, scaling_rows)
        self._uniform_scaling = None
        for name, slot, cluster, scaling in zip(adapter_names, slots, clusters, scalings):
            self.jd_sigma[name] = nn.Parameter(stack[slot], requires_grad=not inference_mode)
            self.jd_cluster[name] = cluster
            self.jd_scaling[name] = scaling

    def delete_adapter(self, adapter_name: str) -> None:
        slot = self.slot_table.slot_of.get(adapter_name)
        if slot is not None and adapter_name in self.jd_sigma:
            self.jd_sigma_stack[slot].zero_()
            self.jd_slot_scaling[slot] = 0
        super().delete_adapter(adapter_name)
        self._uniform_scaling = None

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        # With low_cpu_mem_usage PEFT assigns new parameter objects; restore the views into the stack.
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        if getattr(self, "jd_sigma_stack", None) is not None:
            device = self.jd_sigma[adapter_name].device
            if self.jd_sigma_stack.device != device:
                self._apply(lambda t: t.to(device))
            self._rebind_sigma_views()

    # ----------------------------------------------------------------------------------------------------- maths
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense `ΔW = scaling · U[c] Σ V[c]ᵀ` of one adapter, `(out_features, in_features)`."""
        cluster = self.jd_cluster[adapter_name]
        U, V = self.jd_U[cluster].float(), self.jd_V[cluster].float()
        sigma = self.jd_sigma[adapter_name].float()
        sigma = sigma if sigma.dim() == 2 else torch.diag(sigma)
        return self.jd_scaling[adapter_name] * (U @ sigma @ V.T)

    def _kernel_scaling(self) -> float | torch.Tensor:
        """A float when every adapter has the same scaling (compressed collections: 1.0), saving a gather per call."""
        if self._uniform_scaling is None:
            values = set(self.jd_scaling.values())
            self._uniform_scaling = float(values.pop()) if len(values) == 1 else False
        return self.jd_slot_scaling if self._uniform_scaling is False else self._uniform_scaling

    def _single_adapter_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """Update of one adapter for all rows; differentiable w.r.t. its Σ (training path)."""
        cluster = self.jd_cluster[adapter_name]
        U, V = self.jd_U[cluster], self.jd_V[cluster]
        sigma = self.jd_sigma[adapter_name]
        hidden = x.to(V.dtype) @ V
        hidden = hidden.to(sigma.dtype)
        hidden = hidden * sigma if sigma.dim() == 1 else hidden @ sigma.T
        return self.jd_scaling[adapter_name] * (hidden.to(U.dtype) @ U.T)

    def _mixed_batch_update(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Adds every row's own adapter update (slots from the model's `SlotTable`) with the batched kernel."""
        slot_index = self.slot_table.token_slots(x)
        flat_result = result.reshape(-1, self.out_features)
        jd_lora_apply(
            flat_result,
            x.reshape(-1, self.in_features),
            self.jd_U,
            self.jd_V,
            self.jd_sigma_stack,
            slot_index,
            self.jd_slot_cluster,
            self._kernel_scaling(),
            backend=self.kernel_backend,
        )
        return flat_result.view(result.shape) if flat_result.data_ptr() != result.data_ptr() else result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        if self.slot_table.row_slots is not None:
            if getattr(self, "jd_sigma_stack", None) is None:
                return result
            return self._mixed_batch_update(result, x)
        for adapter_name in self.active_adapters:
            if adapter_name in self.jd_sigma:
                result = result + self._single_adapter_delta(x, adapter_name).to(result.dtype)
        return result

    # ---------------------------------------------------------------------------------------------------- merging
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Adds the active (or given) adapters' ΔW to the base weight (dequantizing/requantizing bnb weights)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter_name in adapter_names:
            if adapter_name not in self.jd_sigma:
                continue
            if self.quantization_backend is not None:
                warnings.warn("Merging into a quantized layer rounds the result to the quantized grid.", stacklevel=2)
            weight = self.get_base_weight()
            merged = weight.float() + self.get_delta_weight(adapter_name).to(weight.device)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {adapter_name!r} seems broken.")
            self.set_base_weight(merged.to(weight.dtype))
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            if adapter_name in self.jd_sigma:
                weight = self.get_base_weight()
                restored = weight.float() - self.get_delta_weight(adapter_name).to(weight.device)
                self.set_base_weight(restored.to(weight.dtype))

    def __repr__(self) -> str:
        return "jdlora." + nn.Module.__repr__(self)


class Linear(nn.Module, JDLoraLayer):
    """JD-LoRA on an `nn.Linear` or a quantized linear layer (bitsandbytes 4-bit/8-bit)."""

    def __init__(self, base_layer: nn.Module, slot_table: SlotTable, **kwargs: Any) -> None:
        super().__init__()
        JDLoraLayer.__init__(self, base_layer, slot_table, **kwargs)

    # nn.Module precedes JDLoraLayer in the MRO; these must resolve to the JD-LoRA versions.
    forward = JDLoraLayer.forward
    _apply = JDLoraLayer._apply
    __repr__ = JDLoraLayer.__repr__
