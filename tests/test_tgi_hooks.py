"""Activation machinery without TGI: post-import hooks, the shards' sitecustomize, settings, unknown adapter ids,
and the serving modules under a PEFT release older than the tuner supports (TGI's image)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from utils import make_collection, tiny_llama

from peft_jd.core import UnknownAdapterError
from tgi_patch import hooks
from tgi_patch.launcher import BOOT_DIR
from tgi_patch.settings import ShardSettings
from tgi_patch.unknown import CheckedAdapterIndex


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_package(root, name="fake_tgi"):
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "target.py").write_text("VALUE = 1\ndef get():\n    return VALUE\n")
    (package / "user.py").write_text("from fake_tgi.target import get\n")
    return package


def test_post_import_hook_patches_before_names_are_bound(tmp_path, monkeypatch):
    _write_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []

    def hook(module):
        seen.append(module.__name__)
        module.get = lambda: "patched"

    finder = hooks.register({"fake_tgi.target": hook})
    try:
        import fake_tgi.user

        assert fake_tgi.user.get() == "patched"
        assert seen == ["fake_tgi.target"]
        assert sys.modules["fake_tgi.target"].__spec__.origin.endswith("target.py")
    finally:
        sys.meta_path.remove(finder)
        for name in ("fake_tgi", "fake_tgi.target", "fake_tgi.user"):
            sys.modules.pop(name, None)


def test_already_imported_modules_are_patched_at_once(tmp_path, monkeypatch):
    _write_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_tgi.target

    try:
        finder = hooks.register({"fake_tgi.target": lambda module: setattr(module, "VALUE", 2)})
        sys.meta_path.remove(finder)
        assert fake_tgi.target.get() == 2
    finally:
        for name in ("fake_tgi", "fake_tgi.target"):
            sys.modules.pop(name, None)


def _run_python(code: str, env_updates: dict, pythonpath: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEFT_JD_TGI")}
    env.update(env_updates)
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_sitecustomize_activates_only_when_launched_and_chains(tmp_path):
    other = tmp_path / "other_site"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['OTHER_SITECUSTOMIZE'] = 'ran'\n")
    code = textwrap.dedent("""
        import os, sys
        import tgi_patch.hooks as hooks
        print(hooks._INSTALLED is not None, os.environ.get('OTHER_SITECUSTOMIZE'),
              'torch' in sys.modules, sorted(hooks.TGI_TARGETS) == sorted(getattr(hooks._INSTALLED, 'hooks', {})))
    """)
    active = _run_python(code, {"PEFT_JD_TGI": "1"}, [BOOT_DIR, str(other), REPO_ROOT])
    assert active.returncode == 0, active.stderr
    assert active.stdout.split() == ["True", "ran", "False", "True"]
    inactive = _run_python(code, {}, [BOOT_DIR, str(other), REPO_ROOT])
    assert inactive.stdout.split() == ["False", "ran", "False", "False"]


_TGI_STACK_CHECK = """
import json, sys, warnings
import torch


class BlockPeftAndTransformers:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("peft", "transformers"):
            raise ImportError(f"{name} is blocked in this test")


sys.meta_path.insert(0, BlockPeftAndTransformers())
warnings.simplefilter("always")
from tgi_patch import forward, launcher, loading, patches, resolve, state, weights  # noqa: E402
from peft_jd.kernels import jd_lora_apply  # noqa: E402

plan = launcher.plan_launch(["--jd-lora-collection", sys.argv[1]], environ={})
_, config, _, _ = loading.load_jd_module_map("task-0", sys.argv[1] + "/adapters/task-0", None, tuple(sys.argv[2:]))
y = jd_lora_apply(torch.zeros(2, 3), torch.ones(2, 4), torch.ones(1, 3, 2), torch.ones(1, 4, 2),
                  torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long))
print(json.dumps({
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("peft", "transformers") or "tuner" in m),
    "adapters": plan.env["PEFT_JD_TGI_ADAPTERS"], "sigmas": len(config.sigmas), "y": y.tolist(),
}))
"""


def test_serving_modules_work_on_tgi_pinned_stack_without_peft_or_transformers(tmp_path):
    """TGI 3.3.7's image pins peft 0.14 (the tuner refuses it): the launcher, loading and kernels import only
    `peft_jd.core` / `peft_jd.kernels`, run with peft and transformers unimportable, and do not warn about the
    tuner."""
    model = tiny_llama()
    make_collection(tmp_path / "coll", model, n_adapters=2, r=4)
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and ".layers." in name]
    pinned = tmp_path / "pinned" / "peft-0.14.0.dist-info"  # what importlib.metadata reports in TGI's image
    pinned.mkdir(parents=True)
    (pinned / "METADATA").write_text("Metadata-Version: 2.1\nName: peft\nVersion: 0.14.0\n")
    result = subprocess.run([sys.executable, "-c", _TGI_STACK_CHECK, str(tmp_path / "coll"), *names],
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(pinned.parent), REPO_ROOT])},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [] and report["adapters"] == "task-0,task-1" and report["sigmas"] == 2 * 3
    # y[t] += U Σ[slot] Vᵀ x[t] with all-ones U, V (rank 2) and x: slot 1 gives 2·(1+1)·2 = 8 per output.
    assert report["y"] == [[0.0, 0.0, 0.0], [8.0, 8.0, 8.0]]
    assert "PEFT tuner is unavailable" not in result.stderr, result.stderr


def test_settings_from_env():
    settings = ShardSettings.from_env({"PEFT_JD_TGI": "1", "PEFT_JD_TGI_ADAPTERS": "a, b,,",
                                       "PEFT_JD_TGI_UNKNOWN_ADAPTER": "WARN", "PEFT_JD_TGI_BASE_ALIASES": "m1,m2"})
    assert settings.enabled and settings.jd_adapters == ["a", "b"] and settings.unknown_adapter == "warn"
    assert {"", "tgi", "__base_model__", "m1", "m2"} <= settings.base_aliases
    assert not ShardSettings.from_env({}).enabled
    with pytest.raises(ValueError, match="PEFT_JD_TGI_UNKNOWN_ADAPTER='ignore'"):
        ShardSettings.from_env({"PEFT_JD_TGI_UNKNOWN_ADAPTER": "ignore"})


def test_unknown_adapter_ids_are_reported():
    strict = CheckedAdapterIndex({"task-1": 1, "task-2": 2}, "error", {"", "my-model"})
    assert strict.get("task-2", 0) == 2 and strict.get("", 0) == 0 and strict.get("my-model", 0) == 0
    assert strict.get(None, 0) == 0 and bool(strict) and len(strict) == 2
    with pytest.raises(UnknownAdapterError, match="'task-3'.*Loaded adapters: task-1, task-2"):
        strict.get("task-3", 0)

    logged = []
    lenient = CheckedAdapterIndex({"task-1": 1}, "warn", {""}, log=logged.append)
    assert lenient.get("typo", 0) == 0 and lenient.get("typo", 0) == 0 and lenient.get("other", 0) == 0
    assert len(logged) == 2 and "'typo'" in logged[0] and "Serving the base model" in logged[0]
    assert lenient.unknown_counts == {"typo": 2, "other": 1}
