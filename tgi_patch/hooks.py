"""Post-import hooks: patch TGI modules right after they execute, before anything binds their names.

`install()` is what `sitecustomize` runs in a shard started by `jd-text-generation-launcher`. It imports nothing
heavy: the patch functions (`tgi_patch.patches`) are imported when the first TGI target module loads. Modules that
are already imported are patched at once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Optional


# TGI module → name of the function in tgi_patch.patches that patches it.
TGI_TARGETS = {
    "text_generation_server.models.globals": "patch_globals",
    "text_generation_server.adapters.weights": "patch_adapters_weights",
    "text_generation_server.adapters.lora": "patch_adapters_lora",
    "text_generation_server.layers.lora": "patch_layers_lora",
    "text_generation_server.utils.adapter": "patch_utils_adapter",
    "text_generation_server.models": "patch_models",
    "text_generation_server.models.flash_causal_lm": "patch_flash_causal_lm",
}


class _HookedLoader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the hook on the executed module."""

    def __init__(self, loader: importlib.abc.Loader, hook: Callable[[ModuleType], None]):
        self._loader = loader
        self._hook = hook

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._hook(module)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class PostImportFinder(importlib.abc.MetaPathFinder):
    """A meta-path finder that wraps the loader of selected modules so that a hook runs after they execute.

    Args:
        hooks: Module name → hook taking the executed module.
    """

    def __init__(self, hooks: dict[str, Callable[[ModuleType], None]]):
        self.hooks = dict(hooks)
        self._local = threading.local()

    def find_spec(self, fullname: str, path=None, target=None) -> Optional[importlib.machinery.ModuleSpec]:
        hook = self.hooks.get(fullname)
        if hook is None or getattr(self._local, "busy", False):
            return None
        self._local.busy = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._local.busy = False
        if spec.loader is None:
            return None
        spec.loader = _HookedLoader(spec.loader, hook)
        return spec


def register(hooks: dict[str, Callable[[ModuleType], None]]) -> PostImportFinder:
    """Runs each hook on its module now if it is imported, else right after it is imported."""
    pending = {}
    for name, hook in hooks.items():
        module = sys.modules.get(name)
        if module is not None:
            hook(module)
        else:
            pending[name] = hook
    finder = PostImportFinder(pending)
    sys.meta_path.insert(0, finder)
    return finder


def _tgi_hook(patch_name: str) -> Callable[[ModuleType], None]:
    def hook(module: ModuleType) -> None:
        getattr(importlib.import_module("tgi_patch.patches"), patch_name)(module)

    return hook


_INSTALLED: Optional[PostImportFinder] = None


def install() -> PostImportFinder:
    """Activates the JD-LoRA patch of TGI in this process (idempotent)."""
    global _INSTALLED
    if _INSTALLED is None:
        _INSTALLED = register({name: _tgi_hook(patch) for name, patch in TGI_TARGETS.items()})
    return _INSTALLED
