"""`JDLoraModel`: the PEFT tuner that injects JD-LoRA layers, owns the adapters' state and serves mixed batches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, resolve_quantization_backend
from torch import nn

from ..core import (
    AdapterFormatError,
    AdapterSpec,
    BaseModelMismatchError,
    BasesMismatchError,
    SharedBases,
    load_shared_bases,
    looks_like_local_path,
    validate_against_bases,
    warn_once,
)
from .adapters import split_checkpoint
from .config import JDLoraConfig
from .layer import JDLoraLayer, Linear
from .loading import SigmaLoadingMixin
from .mixed_batch import MixedBatchMixin
from .slots import SlotTable, check_adapter_name


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


class JDLoraModel(SigmaLoadingMixin, MixedBatchMixin, BaseTuner):
    """
    Creates a JD-LoRA model from a pretrained transformers model: every target module gets a `JDLoraLayer` that
    holds the collection's shared bases (one copy per process) and the Σ of every loaded adapter.

    Every adapter, whichever way it arrives (`PeftModel.from_pretrained`, `load_adapter`, `load_sigma_adapters`,
    `peft_jd.load_adapters`), is checked by the core's one `validate_against_bases` before anything is written.

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
        self._injecting: Optional[tuple[AdapterSpec, SharedBases]] = None
        # Adapters injected with a zero Σ whose weights PEFT has not loaded yet (rolled back if they are invalid).
        self._awaiting_weights: set[str] = set()
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ------------------------------------------------------------------------------------------------ validation
    def _bases_for(self, spec: AdapterSpec, **hub_kwargs: Any) -> SharedBases:
        """The shared bases of an adapter: loaded once per process, the same bases for every adapter of this model,
        made for this base model."""
        location, revision, subfolder = spec.bases_reference()
        shared = load_shared_bases(location, revision, subfolder, spec.bases_fingerprint, spec.name, **hub_kwargs)
        if self.shared_bases is not None and shared is not self.shared_bases:
            raise BasesMismatchError(
                f"adapter {spec.name!r} ({spec.source}) uses bases {shared.key.describe()}, but this model already "
                f"serves bases {self.shared_bases.key.describe()}. One model serves one bases collection (revision); "
                "load the adapter into a separate model, or re-project it onto the loaded bases with `peft-jd add`."
            )
        model_name = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        for name in (spec.base_model_name_or_path, model_name):
            _check_base_model(shared.config.base_model_name_or_path, name, spec.name)
        return shared

    def _validate(self, spec: AdapterSpec, sigmas: Mapping[str, Any], **hub_kwargs: Any) -> SharedBases:
        """The one validation of an adapter (config and Σ, or Σ shapes) against its bases and this model."""
        shared = self._bases_for(spec, **hub_kwargs)
        validate_against_bases(spec, sigmas, shared.config, shared.key.describe())
        return shared

    # ------------------------------------------------------------------------------------------------- injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        check_adapter_name(adapter_name)
        config = self.peft_config[adapter_name]
        spec = config.to_spec(adapter_name)
        shared = self._bases_for(spec)
        planned = self._planned_targets(config, model)
        if planned:  # all modules at once, so that a bad adapter leaves the model untouched
            shapes = {key: spec.sigma_shape(key) for key in planned}
            validate_against_bases(spec, shapes, shared.config, shared.key.describe())
        self._injecting = (spec, shared)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:
            self._remove_from_layers([adapter_name])
            raise
        finally:
            _, shared = self._injecting
            self._injecting = None
        self.shared_bases = shared
        self._awaiting_weights.add(adapter_name)

    def _planned_targets(self, config: JDLoraConfig, model: nn.Module) -> list[str]:
        """Module keys PEFT's injection will adapt, by PEFT's own matching rule (empty when PEFT still has to fill in
        `target_modules`; each module is then validated as it is injected)."""
        if config.target_modules is None:
            return []
        inside_layers = tuple(f"{key}." for key, module in model.named_modules() if isinstance(module, BaseTunerLayer))
        return [
            key
            for key, _ in model.named_modules()
            if key and not key.startswith(inside_layers) and self._check_target_module_exists(config, key)
        ]

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        spec, shared = self._injecting
        # Shapes only: the weights are checked when PEFT hands them over (`_remap_adapter_state_dict_for_load`).
        shapes = {current_key: spec.sigma_shape(current_key)}
        validate_against_bases(spec, shapes, shared.config, shared.key.describe())
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
            sigma_type=config.sigma_type,
            cluster=spec.cluster_of(current_key),
            scaling=config.scaling,
            inference_mode=config.inference_mode,
        )
        if layer is not target:
            self._replace_module(parent, target_name, layer, target)
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # PEFT hands every checkpoint (`from_pretrained`, `load_adapter`, `set_peft_model_state_dict`) to the tuner
        # here, before writing it: the one place where its Σ can be validated like any other loader's.
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, JDLoraModel):
            tuner.check_checkpoint(adapter_name, state_dict)
        else:
            spec = config.to_spec(adapter_name)
            sigmas, _ = split_checkpoint(spec, state_dict, "<state dict>")
            location, revision, subfolder = spec.bases_reference()
            shared = load_shared_bases(location, revision, subfolder, spec.bases_fingerprint, adapter_name)
            validate_against_bases(spec, sigmas, shared.config, shared.key.describe())
        return super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )

    def check_checkpoint(self, adapter_name: str, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Validates a PEFT checkpoint of a loaded adapter before PEFT writes it.

        An adapter injected by the same `load_adapter` call (zero Σ, never loaded) is removed again when its
        checkpoint is refused, so the model is left as it was before the call.

        Raises:
            `JDLoraError`: as `validate_against_bases`, or `AdapterFormatError` for Σ of modules this model does
            not adapt for the adapter.
        """
        spec = self.peft_config[adapter_name].to_spec(adapter_name)
        try:
            sigmas, _ = split_checkpoint(spec, state_dict, f"checkpoint of adapter {adapter_name!r}")
            self._validate(spec, sigmas)
            self._check_adapted_modules(spec, sigmas, holding=adapter_name)
        except BaseException:
            if self._is_untouched_injection(adapter_name):
                self._awaiting_weights.discard(adapter_name)
                self.delete_adapter(adapter_name)
            raise
        self._awaiting_weights.discard(adapter_name)

    def _is_untouched_injection(self, adapter_name: str) -> bool:
        """Injected by PEFT and still all-zero (nothing trained or loaded), and not the model's only adapter."""
        if adapter_name not in self._awaiting_weights or len(self.peft_config) < 2:
            return False
        layers = self.jd_layers().values()
        sigmas = [layer.jd_sigma[adapter_name] for layer in layers if adapter_name in layer.jd_sigma]
        # Σ still on the meta device (low_cpu_mem_usage) was never written either.
        return all(sigma.is_meta or not torch.count_nonzero(sigma) for sigma in sigmas)

    def _check_adapted_modules(
        self, spec: AdapterSpec, sigmas: Mapping[str, Any], holding: Optional[str], layers: Optional[dict] = None
    ) -> None:
        """Σ must target modules this model adapts (for `holding`: modules holding that adapter)."""
        layers = self.jd_layers() if layers is None else layers
        adapted = layers.keys() if holding is None else {k for k, v in layers.items() if holding in v.jd_sigma}
        unknown = sorted(set(sigmas) - adapted)
        if unknown:
            raise AdapterFormatError(
                f"adapter {spec.name!r} ({spec.source}) has Σ for module(s) {unknown[:5]} that this model does not "
                "adapt; it targets other modules than the loaded collection."
            )

    # ---------------------------------------------------------------------------------------------- PEFT hooks
    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Σ follows the base layer's dtype, upcast from fp16/bf16 to fp32 when `autocast_adapter_dtype` (PEFT's
        convention). All adapters of a layer share one Σ stack, so the most recent load decides for all of them."""
        for layer in self.jd_layers().values():
            if adapter_name in layer.jd_sigma:
                layer.cast_sigmas(layer.sigma_dtype(autocast_adapter_dtype))

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if self.prefix not in name:
                param.requires_grad = False

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.slot_table.release(adapter_name)
        self._awaiting_weights.discard(adapter_name)

    def jd_layers(self) -> dict[str, JDLoraLayer]:
        """Module key → JD-LoRA layer of every adapted module."""
        return {name: module for name, module in self.model.named_modules() if isinstance(module, JDLoraLayer)}

    def _remove_from_layers(self, adapter_names: list[str]) -> None:
        """Removes adapters from the layers and frees their slots (rollback of a failed load)."""
        for layer in self.jd_layers().values():
            for name in adapter_names:
                if name in layer.jd_sigma:
                    layer.delete_adapter(name)
        for name in adapter_names:
            self.slot_table.release(name)
