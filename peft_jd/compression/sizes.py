"""The cost model of a collection, in stored values and bytes: one place for `report.json`, `compress --budget` and
`add`.

A collection's bytes per adapter are its Σ and `modules_to_save` plus its share of the bases, which every adapter of
the collection shares: `Σ bytes + saved bytes + bases bytes / n`. LoRAs are counted at 2 bytes per parameter (fp16,
the precision they are served in), so a ratio like `16x` compares with what serving the LoRAs themselves would cost.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..core import UsageError


STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_BYTES = {name: dtype.itemsize for name, dtype in STORAGE_DTYPES.items()}
# LoRA factors and modules_to_save tensors are counted at fp16, their serving precision.
REFERENCE_BYTES = 2


def dtype_bytes(name: str) -> int:
    """Bytes of one stored value of dtype `name` (`float32`, `bfloat16`, `float16`)."""
    if name not in DTYPE_BYTES:
        raise UsageError(f"unknown storage dtype {name!r}; choose one of {', '.join(DTYPE_BYTES)}.")
    return DTYPE_BYTES[name]


def sigma_values(rank: int, sigma_type: str) -> int:
    """Values of one Σ: `k²` for full Σ, `k` for diagonal Σ."""
    return rank * rank if sigma_type == "full" else rank


def bases_values(rank: int, num_clusters: int, in_features: int, out_features: int) -> int:
    """Values of one module's bases `U (c, out, k)` and `V (c, in, k)`."""
    return num_clusters * rank * (in_features + out_features)


@dataclass(frozen=True)
class StorageCost:
    """Bytes per adapter of a module at a rank, with the bases shared by `num_adapters` adapters.

    Args:
        sigma_type: `"full"` or `"diag"`.
        num_adapters: Adapters sharing the bases.
        sigma_dtype: Storage dtype of Σ.
        bases_dtype: Storage dtype of U and V.
    """

    sigma_type: str
    num_adapters: int
    sigma_dtype: str = "float32"
    bases_dtype: str = "float32"

    def module_bytes(self, rank: int, num_clusters: int, in_features: int, out_features: int) -> float:
        """Σ bytes of one adapter plus its share of the module's bases bytes."""
        sigma = sigma_values(rank, self.sigma_type) * dtype_bytes(self.sigma_dtype)
        bases = bases_values(rank, num_clusters, in_features, out_features) * dtype_bytes(self.bases_dtype)
        return sigma + bases / max(1, self.num_adapters)


@dataclass(frozen=True)
class Budget:
    """A memory budget per adapter: a ratio to the LoRAs' bytes (`16x`) or a number of bytes (`200000`, `150KB`).

    Args:
        ratio: LoRA bytes (at fp16) divided by the collection's bytes per adapter, if given as a ratio.
        bytes_per_adapter: The budget in bytes, if given as bytes.
    """

    ratio: float | None = None
    bytes_per_adapter: float | None = None

    @classmethod
    def parse(cls, text: str | float | int) -> Budget:
        """`"16x"` → a ratio; `"200000"`, `"150KB"`, `"1.5MiB"` → bytes per adapter."""
        if isinstance(text, (int, float)):
            return cls(bytes_per_adapter=float(text))
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        units = {"": 1, "b": 1, "kb": 1e3, "kib": 2**10, "mb": 1e6, "mib": 2**20}
        if match and match.group(2).lower() == "x" and float(match.group(1)) > 0:
            return cls(ratio=float(match.group(1)))
        if match and match.group(2).lower() in units and float(match.group(1)) > 0:
            return cls(bytes_per_adapter=float(match.group(1)) * units[match.group(2).lower()])
        raise UsageError(f"cannot read budget {text!r}: give a ratio to the LoRAs like '16x' or bytes per adapter "
                         "like '200000', '150KB' or '1.5MiB'.")

    def resolve(self, lora_bytes_per_adapter: float) -> float:
        """The budget in bytes per adapter, for LoRAs of `lora_bytes_per_adapter` bytes (at fp16)."""
        if self.bytes_per_adapter is not None:
            return self.bytes_per_adapter
        return lora_bytes_per_adapter / self.ratio

    def describe(self) -> str:
        if self.ratio is not None:
            return f"{self.ratio:g}x"
        return f"{self.bytes_per_adapter:,.0f} bytes"
