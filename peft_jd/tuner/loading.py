"""Loading many sigma adapters into a `JDLoraModel` at once: validate all, then write each layer with one copy."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import AuxiliaryTrainingWrapper, set_additional_trainable_modules

from ..core import PEFT_KEY_PREFIX, AdapterFormatError, AdapterNameError, ShapeMismatchError, SharedBases
from .adapters import SigmaAdapter
from .config import JDLoraConfig
from .slots import check_adapter_name


@dataclass
class _LayerRows:
    """The Σ rows one layer receives from a call of `load_sigma_adapters`."""

    names: list[str] = field(default_factory=list)
    sigmas: list[torch.Tensor] = field(default_factory=list)
    clusters: list[int] = field(default_factory=list)
    scalings: list[float] = field(default_factory=list)


class SigmaLoadingMixin:
    """`JDLoraModel.load_sigma_adapters` and its helpers (the model owns the adapters' state; readers only read)."""

    def check_new_adapter_names(self, names: Sequence[str]) -> None:
        """Raises `AdapterNameError` for a name torch cannot hold, already loaded, or repeated in `names`."""
        for name in names:
            check_adapter_name(name)
        repeated = {name for name, count in Counter(names).items() if count > 1}
        duplicates = sorted({name for name in names if name in self.peft_config} | repeated)
        if duplicates:
            raise AdapterNameError(
                f"adapter name(s) already loaded or repeated: {duplicates[:10]}; pass distinct adapter_names."
            )

    def load_sigma_adapters(
        self, adapters: Sequence[SigmaAdapter], inference_mode: bool = True, **hub_kwargs: Any
    ) -> list[str]:
        """Loads already-read sigma adapters: all are validated, then written with one indexed copy per layer.

        All or nothing: if any adapter is refused (or a write fails), none of them is loaded and the model is as
        before the call. No walk over the model's modules per adapter, unless an adapter has `modules_to_save`
        (PEFT's wrappers are then created for it).

        Args:
            adapters: The adapters, e.g. from `peft_jd.bulk.read_sigma_adapter`.
            inference_mode: Freeze their Σ.
            hub_kwargs: For downloading bases not loaded yet (`token`, `cache_dir`, …).

        Returns:
            The names of the loaded adapters.

        Raises:
            `JDLoraError`: as `peft_jd.core.validate_against_bases`; `AdapterNameError` for unusable or duplicate
            names; `BasesMismatchError` for adapters of other bases than this model's; `AdapterFormatError` for Σ of
            modules this model does not adapt or `modules_to_save` tensors that do not fit.
        """
        adapters = list(adapters)
        names = [adapter.name for adapter in adapters]
        self.check_new_adapter_names(names)
        layers = self.jd_layers()
        shared: Optional[SharedBases] = None
        for adapter in adapters:
            shared = self._validate(adapter.spec, adapter.sigmas, **hub_kwargs)
            self._check_adapted_modules(adapter.spec, adapter.sigmas, holding=None, layers=layers)
        if not adapters:
            return []
        self.slot_table.reserve(len(adapters))
        try:
            for adapter in adapters:
                self.peft_config[adapter.name] = JDLoraConfig.from_spec(adapter.spec, inference_mode)
            self._write_rows(adapters, layers, shared, inference_mode)
            for adapter in adapters:
                if adapter.saved_modules or adapter.spec.modules_to_save:
                    self._load_saved_modules(adapter)
        except BaseException:
            self._unload(names)
            raise
        return names

    def _write_rows(self, adapters: list[SigmaAdapter], layers: dict, shared: SharedBases, inference_mode: bool):
        per_layer: dict[str, _LayerRows] = {}
        for adapter in adapters:
            for module_key, sigma in adapter.sigmas.items():
                rows = per_layer.setdefault(module_key, _LayerRows())
                rows.names.append(adapter.name)
                rows.sigmas.append(sigma)
                rows.clusters.append(adapter.spec.cluster_of(module_key))
                rows.scalings.append(adapter.spec.scaling)
        for module_key, rows in per_layer.items():
            layer = layers[module_key]
            layer.attach_bases(shared, module_key)
            layer.write_sigmas(
                rows.names, rows.sigmas, rows.clusters, rows.scalings, shared.config.sigma_type, inference_mode
            )

    def _load_saved_modules(self, adapter: SigmaAdapter) -> None:
        """Creates PEFT's `ModulesToSaveWrapper` copies for the adapter and fills them from its file."""
        config = self.peft_config[adapter.name]
        set_additional_trainable_modules(
            model=self.model,
            peft_config=config,
            model_config=BaseTuner.get_model_config(self),
            adapter_name=adapter.name,
            activate_adapter=False,
        )
        used: set[str] = set()
        for module_name, wrapper in self.model.named_modules():
            if not isinstance(wrapper, AuxiliaryTrainingWrapper):
                continue
            load_map = wrapper.adapter_state_dict_load_map(adapter.name)
            if load_map:
                tensors = self._saved_tensors(adapter, module_name, wrapper, load_map)
                wrapper.load_state_dict(tensors, strict=False)
                used.update(f"{PEFT_KEY_PREFIX}{module_name}.{key}" for key in load_map)
        unused = sorted(set(adapter.saved_modules) - used)
        if unused:
            raise AdapterFormatError(
                f"adapter {adapter.name!r} ({adapter.spec.source}) holds tensors {unused[:5]} that none of its "
                f"modules_to_save {adapter.spec.modules_to_save} matches in this model."
            )

    @staticmethod
    def _saved_tensors(adapter: SigmaAdapter, module_name: str, wrapper, load_map: dict[str, str]) -> dict:
        current = wrapper.state_dict()
        tensors = {}
        for key, target in load_map.items():
            file_key = f"{PEFT_KEY_PREFIX}{module_name}.{key}"
            tensor = adapter.saved_modules.get(file_key)
            if tensor is None:
                raise AdapterFormatError(
                    f"adapter {adapter.name!r} ({adapter.spec.source}) lists {module_name!r} in modules_to_save but "
                    f"its file has no {file_key!r}."
                )
            if tuple(tensor.shape) != tuple(current[target].shape):
                raise ShapeMismatchError(
                    f"adapter {adapter.name!r}: {file_key} has shape {tuple(tensor.shape)}, but {module_name} of this "
                    f"model expects {tuple(current[target].shape)}. The adapter was trained on another base model."
                )
            tensors[target] = tensor
        return tensors

    def _unload(self, names: list[str]) -> None:
        """Removes partly loaded adapters again (rollback of a failed `load_sigma_adapters`)."""
        self._remove_from_layers(names)
        for wrapper in self.model.modules():
            if isinstance(wrapper, AuxiliaryTrainingWrapper):
                for name in names:
                    wrapper.delete_adapter(name, new_active_adapters=list(wrapper.active_adapters))
        for name in names:
            self.peft_config.pop(name, None)
