"""Activation-aware compression: the error that matters is `(ΔW_i − U Σ_i Vᵀ) x` on the inputs the layer sees.

`collect_input_statistics` runs the base model on calibration texts and accumulates, per target module, the input
second moment `C = E[x xᵀ]` (modules fed the same tensor, like q/k/v of one layer, share one matrix). With
`C + λ·mean(diag C)·I = L Lᵀ` (Cholesky; λ the damping), `‖E X‖²_F ∝ ‖E L‖²_F`, so compressing the whitened updates
`ΔW_i L` with the ordinary solvers minimises the activation error; the input bases are mapped back with
`V = L⁻ᵀ V'` (then `U Σ Vᵀ L = U Σ V'ᵀ`). Serving is unchanged: the kernels never assume orthonormal bases.
With `C = I` this is exactly plain JD (tested), and a large damping tends to it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..core import AdapterFormatError, UsageError, atomic_write_bytes
from .stack import CanonicalStack, canonicalize


__all__ = ["InputStatistics", "collect_input_statistics", "whiten_stack"]

CALIBRATION_FORMAT = "peft-jd-calibration"
DEFAULT_DAMPING = 0.01


@dataclass
class InputStatistics:
    """Input second moments of a model's target modules.

    Args:
        moments: Group index → `(d_in, d_in)` fp32 mean of `x xᵀ`.
        groups: Module key → group index (modules fed the same input share a group).
        tokens: Number of tokens averaged.
        model: The model the statistics come from (for messages).
    """

    moments: dict[int, torch.Tensor]
    groups: dict[str, int]
    tokens: int
    model: str | None = None

    def save(self, path: str | os.PathLike) -> Path:
        """Writes a safetensors file atomically."""
        tensors = {f"inputs.{g}": moment.contiguous() for g, moment in self.moments.items()}
        metadata = {"format": CALIBRATION_FORMAT, "groups": json.dumps(self.groups), "tokens": str(self.tokens),
                    "model": self.model or ""}
        atomic_write_bytes(Path(path), save(tensors, metadata=metadata))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> InputStatistics:
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != CALIBRATION_FORMAT:
                    raise AdapterFormatError(f"{path} is not a peft-jd calibration file; create one with "
                                             "`peft-jd calibrate`.")
                groups = {key: int(g) for key, g in json.loads(metadata["groups"]).items()}
                moments = {g: handle.get_tensor(f"inputs.{g}").float() for g in set(groups.values())}
        except (OSError, ValueError, KeyError) as exc:
            raise AdapterFormatError(f"cannot read calibration statistics {path}: {exc}") from exc
        return cls(moments, groups, int(metadata.get("tokens", 0)), metadata.get("model") or None)

    def fingerprint(self) -> str:
        """sha256 of the moments (a resumed compression must use the same statistics)."""
        digest = hashlib.sha256(json.dumps(self.groups, sort_keys=True).encode())
        for group in sorted(self.moments):
            digest.update(self.moments[group].contiguous().numpy().tobytes())
        return digest.hexdigest()

    def whitener(self, module_key: str, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
        """Lower-triangular `L` (fp64) with `L Lᵀ = C + damping·mean(diag C)·I` for `module_key`."""
        if module_key not in self.groups:
            raise UsageError(f"the calibration statistics hold no inputs of module {module_key!r}; collect them for "
                             "the same model and target modules as the LoRAs.")
        moment = self.moments[self.groups[module_key]].double()
        ridge = damping * float(moment.diagonal().mean().clamp_min(1e-12))
        return torch.linalg.cholesky(moment + ridge * torch.eye(moment.shape[0], dtype=moment.dtype))


def whiten_stack(stack: CanonicalStack, whitener: torch.Tensor) -> CanonicalStack:
    """The canonical stack of `ΔW_i L` (the updates seen through the inputs' statistics)."""
    if whitener.shape != (stack.d_in, stack.d_in):
        raise UsageError(f"calibration statistics of size {whitener.shape[0]} do not match the module's input size "
                         f"{stack.d_in}; they were collected on another model.")
    scale = whitener[0, 0]
    if torch.equal(whitener, scale * torch.eye(stack.d_in, dtype=whitener.dtype)):
        # White inputs: the same thin SVDs, scaled — so that the solvers see exactly the plain problem.
        return CanonicalStack(stack.lt, stack.rt, stack.s * scale)
    right = (stack.s.unsqueeze(-1) * (stack.rt.double() @ whitener)).float()
    return canonicalize(stack.lt.clone(), right)


def unwhiten_bases(V: torch.Tensor, whitener: torch.Tensor) -> torch.Tensor:
    """`V = L⁻ᵀ V'`: input bases of the original space from those of the whitened one (`(c, d_in, k)`)."""
    restored = torch.linalg.solve_triangular(whitener.T, V.double().reshape(-1, V.shape[1], V.shape[2]), upper=True)
    return restored.to(V.dtype)


@torch.no_grad()
def collect_input_statistics(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                             target_modules: Sequence[str], model_name: str | None = None) -> InputStatistics:
    """Accumulates `E[x xᵀ]` of every linear module whose name ends with one of `target_modules`.

    Args:
        model: The base transformers model.
        batches: Tokenized batches (`input_ids`, `attention_mask`); padding tokens are left out.
        target_modules: Module name suffixes (as LoRA's `target_modules`).
        model_name: Recorded in the file.
    """
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in set(target_modules)}
    if not linears:
        raise UsageError(f"no linear module of the model ends with one of {list(target_modules)}.")
    sums: dict[int, torch.Tensor] = {}
    groups: dict[str, int] = {}
    state = {"mask": None, "seen": {}}
    tokens = 0

    def hook(name):
        def record(_module, inputs):
            x = inputs[0]
            seen = state["seen"]
            entry = seen.get(id(x))
            if entry is not None and entry[1] is x:  # the same input as another module (q/k/v): one moment for all
                groups.setdefault(name, entry[0])
                return
            group = groups.setdefault(name, len(sums))
            # The tensor is kept until the forward ends, so that its id cannot be reused by another layer's input.
            seen[id(x)] = (group, x)
            rows = x.reshape(-1, x.shape[-1])[state["mask"]].double()
            moment = rows.T @ rows
            sums[group] = moment if group not in sums else sums[group] + moment
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in linears.items()]
    try:
        for batch in batches:
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).reshape(-1).bool()
            state["mask"], state["seen"] = mask, {}
            model(**batch)
            tokens += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise UsageError("the calibration texts produced no tokens.")
    moments = {g: (total / tokens).float() for g, total in sums.items()}
    return InputStatistics(moments, groups, tokens, model_name)


@dataclass
class Whitening:
    """The whitening of one compression run: the statistics and the damping, applied module by module.

    Args:
        statistics: Input second moments of the base model.
        damping: Ridge added to each moment, relative to the mean of its diagonal.
    """

    statistics: InputStatistics
    damping: float = DEFAULT_DAMPING

    def apply(self, stack: CanonicalStack, module_key: str) -> CanonicalStack:
        """The module's updates as seen through its inputs (`ΔW_i L`)."""
        return whiten_stack(stack, self.statistics.whitener(module_key, self.damping))

    def restore(self, V: torch.Tensor, module_key: str) -> torch.Tensor:
        """Input bases of the original space (`L⁻ᵀ V'`)."""
        return unwhiten_bases(V, self.statistics.whitener(module_key, self.damping))

    def settings(self) -> dict:
        return {"tokens": self.statistics.tokens, "damping": self.damping, "model": self.statistics.model,
                "fingerprint": self.statistics.fingerprint()}
