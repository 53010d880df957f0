"""Serve JD-LoRA collections with text-generation-inference (TGI v3.3.7) without forking it.

`jd-text-generation-launcher` (`tgi_patch.launcher`) validates the JD adapters, adds them to TGI's `--lora-adapters`,
and starts TGI's launcher with `PEFT_JD_TGI=1` and `tgi_patch/_boot` on `PYTHONPATH`; the shards then run
`tgi_patch.hooks.install()`, which patches TGI's adapter loading, batching and layer forward (`tgi_patch.patches`).
The serving modules import only `peft_jd.core` and `peft_jd.kernels`, which need neither peft nor transformers.
See `docs/tgi.md`.
"""

import warnings

from .hooks import install
from .settings import ENABLE_ENV


# TGI 3.3.7's image pins peft 0.14 on purpose (newer transformers break TGI), so `import peft_jd` there warns that
# its PEFT tuner is unavailable and advises upgrading PEFT. tgi_patch never uses the tuner, and that advice would
# break TGI: ignore this one warning when a tgi_patch module triggers it (registered here so that importing the
# package stays light; the shards' sitecustomize imports it).
warnings.filterwarnings("ignore", message="peft-jd's PEFT tuner is unavailable", category=UserWarning,
                        module=r"tgi_patch(\.|$)")

__all__ = ["ENABLE_ENV", "install"]
