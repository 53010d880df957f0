"""Joint compression of LoRA collections (JD-Full, JD-Diag, clustering, SVD baseline) into JD-LoRA collections.

```py
>>> from peft_jd.compression import compress, extend_collection
>>> report = compress(["loras/a", "loras/b", "org/lora-c@main"], "collection/", method="jd-full", rank=16)
>>> report.mean_err2, report.sizes["compression_ratio"]
>>> extend_collection("collection/", ["loras/new"])
```

Writers of a collection (`compress`, `extend_collection`) hold its lock and publish it with one atomic swap; an
existing folder is replaced only if it is a peft-jd collection (or with `overwrite=True`). See docs/compression.md.
"""

from .algorithms import METHODS, compress_stack, project_stack
from .engine import compress
from .incremental import extend_collection
from .lora_io import HubOptions, LoraAdapter, load_lora, load_loras
from .report import CompressionReport
from .result import CompressionResult
from .stack import CanonicalStack, read_factors, read_module_stack, stack_from_factors


__all__ = [
    "METHODS",
    "CanonicalStack",
    "CompressionReport",
    "CompressionResult",
    "HubOptions",
    "LoraAdapter",
    "compress",
    "extend_collection",
    "compress_stack",
    "load_lora",
    "load_loras",
    "project_stack",
    "read_factors",
    "read_module_stack",
    "stack_from_factors",
]
