"""Serve JD-LoRA collections with text-generation-inference (TGI v3.3.7) without forking it.

`jd-text-generation-launcher` (`tgi_patch.launcher`) validates the JD adapters, adds them to TGI's `--lora-adapters`,
and starts TGI's launcher with `PEFT_JD_TGI=1` and `tgi_patch/_boot` on `PYTHONPATH`; the shards then run
`tgi_patch.hooks.install()`, which patches TGI's adapter loading, batching and layer forward (`tgi_patch.patches`).
See `docs/tgi.md`.
"""

from .hooks import install
from .settings import ENABLE_ENV


__all__ = ["ENABLE_ENV", "install"]
