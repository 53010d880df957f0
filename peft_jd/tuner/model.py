"""`JDLoraModel`: the PEFT tuner that injects JD-LoRA layers and serves mixed batches of adapters."""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, resolve_quantization_backend
from torch import nn

from ..core import (
    BaseModelMismatchError,
    BasesMismatchError,
    ShapeMismatchError,
    SharedBases,
    SigmaTypeMismatchError,
    UnknownAdapterError,
    load_shared_bases,
    looks_like_local_path,
    warn_once,
)
from .config import JDLoraConfig
from .layer import JDLoraLayer, Linear
from .slots import BASE_ADAPTER_NAME, SlotTable, check_adapter_name


def _is_supported_target(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    backend = resolve_quantization_backend(module)
    return backend is not None and backend.layer_type == "linear"


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not looks_like_local_path(name)


def _check_base_model(expected: Optional[str], actual: Optional[str], adapter_name: str) -> None:
    """Hub ids are identities: two different ones are an error. Local paths and GGUF names are not, so only warn."""
    if not expected or not actual or expected.rstrip("/") == actual.rstrip("/"):
        return
    message = (
        f"adapter {adapter_name!r}: its bases were compressed for base model {expected!r}, but it is being loaded "
        f"for {actual!r}."
    )
    if _is_hub_id(expected) and _is_hub_id(actual) and expected.lower() != actual.lower():
        raise BaseModelMismatchError(message + " Load it on the base model it was trained for.")
    # Once per pair of names, not once per adapter of a collection.
    warn_once(("load", expected, actual), message + " Layer shapes match; make sure this is the same model.", 3)


class JDLoraModel(BaseTuner):
    """
    Creates a JD-LoRA model from a pretrained transformers model: every target module gets a `JDLoraLayer` that
    holds the collection's shared bases (one copy per process) and the Σ of every loaded adapter.

    Args:
        model ([`torch.nn.Module`]): The model to be adapted.
        config ([`JDLoraConfig`]): The configuration of the JD-LoRA adapter.
        adapter_name (`str`): The name of the adapter, defaults to `"default"`.
        low_cpu_mem_usage (`bool`, *optional*, defaults to `False`): Create empty adapter weights on meta device.

    Example:

        ```py
        >>> import peft_jd
        >>> from peft import PeftModel
        >>> model = PeftModel.from_pretrained(base_model, "collection/adapters/task-17")
        >>> model.load_adapter("collection/adapters/task-42", adapter_name="task-42")
        >>> out = model.generate(**batch, adapter_names=["default", "task-42", "__base__"])
        ```
    """

    prefix: str = "jd_"
    tuner_layer_cls = JDLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        # Must exist before BaseTuner.__init__ injects the first adapter.
        self.slot_table = SlotTable()
        self.shared_bases: Optional[SharedBases] = None
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ------------------------------------------------------------------------------------------------- injection
    def _resolve_bases(self, config: JDLoraConfig, adapter_name: str) -> SharedBases:
        shared = load_shared_bases(
            config.bases,
            revision=config.bases_revision,
            subfolder=config.bases_subfolder,
            expected_fingerprint=config.bases_fingerprint,
            adapter_name=adapter_name,
        )
        if self.shared_bases is not None and shared is not self.shared_bases:
            raise BasesMismatchError(
                f"adapter {adapter_name!r} uses bases {shared.key.describe()}, but this model already serves bases "
                f"{self.shared_bases.key.describe()}. One model serves one bases collection (revision); load the "
                "adapter into a separate model, or re-project it onto the loaded bases with `peft-jd add`."
            )
        if shared.config.r != config.r:
            raise SigmaTypeMismatchError(
                f"adapter {adapter_name!r} has r={config.r} but its bases {shared.key.describe()} have r="
                f"{shared.config.r}."
            )
        if shared.config.sigma_type != config.sigma_type:
            raise SigmaTypeMismatchError(
                f"adapter {adapter_name!r} has sigma_type={config.sigma_type!r} but its bases were compressed for "
                f"sigma_type={shared.config.sigma_type!r}."
            )
        self._check_clusters(config, shared, adapter_name)
        model_name = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        for name in (config.base_model_name_or_path, model_name):
            _check_base_model(shared.config.base_model_name_or_path, name, adapter_name)
        return shared

    @staticmethod
    def _check_clusters(config: JDLoraConfig, shared: SharedBases, adapter_name: str) -> None:
        # Checked before injection so that a bad adapter leaves the model untouched.
        clusters = (
            config.cluster
            if isinstance(config.cluster, dict)
            else dict.fromkeys(shared.config.modules, config.cluster)
        )
        for module_key, cluster in clusters.items():
            spec = shared.config.modules.get(module_key)
            if spec is not None and not 0 <= int(cluster) < spec.num_clusters:
                raise ShapeMismatchError(
                    f"adapter {adapter_name!r} is assigned cluster {cluster} for module {module_key}, but its bases "
                    f"have {spec.num_clusters} cluster(s). The adapter was compressed against other bases."
                )

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        check_adapter_name(adapter_name)
        config = self.peft_config[adapter_name]
        self._injecting_bases = self._resolve_bases(config, adapter_name)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            shared, self._injecting_bases = self._injecting_bases, None
        self.shared_bases = shared

    def _check_new_adapter_config(self, config: JDLoraConfig) -> None:
        super()._check_new_adapter_config(config)
        for existing in self.peft_config.values():
            if existing is not config and existing.sigma_type != config.sigma_type:
                raise SigmaTypeMismatchError(
                    f"cannot mix sigma_type={config.sigma_type!r} with loaded sigma_type={existing.sigma_type!r} "
                    "adapters in one model."
                )

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        shared = self._injecting_bases
        shared.module(current_key)  # fail on uncovered modules before touching the model
        if isinstance(target, JDLoraLayer):
            layer = target
        else:
            base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            if not _is_supported_target(base_layer):
                raise TypeError(
                    f"Target module {current_key} ({type(base_layer).__name__}) is not supported; JD-LoRA supports "
                    "torch.nn.Linear and bitsandbytes 4-bit/8-bit linear layers."
                )
            layer = Linear(target, self.slot_table)
        layer.attach_bases(shared, current_key)
        layer.update_layer(
            adapter_name,
            rank=config.r,
            sigma_type=config.sigma_type,
            cluster=config.cluster_of(current_key),
            scaling=config.scaling,
            inference_mode=config.inference_mode,
            module_key=current_key,
        )
        if layer is not target:
            self._replace_module(parent, target_name, layer, target)
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if self.prefix not in name:
                param.requires_grad = False

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.slot_table.release(adapter_name)

    # ---------------------------------------------------------------------------------------------- mixed batches
    def jd_layers(self) -> dict[str, JDLoraLayer]:
        """Module key → JD-LoRA layer of every adapted module."""
        return {name: module for name, module in self.model.named_modules() if isinstance(module, JDLoraLayer)}

    def adapter_slots(self, adapter_names: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """Per-row slot tensor for `adapter_names`; raises `UnknownAdapterError` for names that are not loaded."""
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER_NAME and n not in self.slot_table})
        if unknown:
            loaded = sorted(self.slot_table.slot_of)
            shown = ", ".join(loaded[:10]) + (f", … ({len(loaded)} in all)" if len(loaded) > 10 else "")
            raise UnknownAdapterError(
                f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. Loaded adapters: {shown}. "
                f"Load them with `model.load_adapter(...)` or `peft_jd.load_adapters(...)`, or use "
                f"{BASE_ADAPTER_NAME!r} for the base model."
            )
        return self.slot_table.slots_for_names(list(adapter_names), device=device)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names must be a list of str, got {type(adapter_names).__name__}.")
        layers = list(self.jd_layers().values())
        if any(layer.merged for layer in layers):
            raise ValueError("Cannot pass `adapter_names` while adapters are merged; call `unmerge_adapter()` first.")
        device = layers[0].jd_U.device if layers else "cpu"
        row_slots = self.adapter_slots(list(adapter_names), device=device)
        previous = self.slot_table.row_slots
        self.slot_table.set_rows(row_slots)
        try:
            yield
        finally:
            self.slot_table.set_rows(previous)
