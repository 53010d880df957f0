"""Activates the peft-jd patch of TGI in processes started by `jd-text-generation-launcher`.

The launcher puts this folder first on `PYTHONPATH` and sets `PEFT_JD_TGI=1`; TGI's launcher passes its environment
to the `text-generation-server` shards, whose interpreter imports this module at startup. Another `sitecustomize`
further down `sys.path` (the environment's own) still runs.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _activate() -> None:
    if os.environ.get("PEFT_JD_TGI") == "1":
        from tgi_patch.hooks import install

        install()


def _chain_next_sitecustomize() -> None:
    here = os.path.dirname(os.path.realpath(__file__))
    others = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_activate()
_chain_next_sitecustomize()
