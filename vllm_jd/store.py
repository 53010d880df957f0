"""The JD-LoRA state of one vLLM worker: shared bases once per module, one Σ stack for every loaded JD adapter.

Nothing here imports vLLM, so the maths can be tested against a dense reference without an engine:

* a `JDLayer` stands for one vLLM linear layer (possibly packed, like `qkv_proj` = q, k, v); each `JDProjection`
  holds, for one module of the bases (or a fused group, see `JDProjection`), the output columns it writes,
  `U (c, out, r)`, `V (c, in, r)` resident once, a Σ stack `(capacity, r, r)` (or `(capacity, r)` for diagonal Σ)
  with the adapter's scaling folded in, and the adapter → cluster map;
* a `JDStore` owns the layers, the slot allocator (slot 0 = rows without JD adapter, zero Σ) and the slot of every
  token of the current step; `apply(y, x, layer_id)` adds `U Σ[slot] Vᵀ x` to every row through
  `peft_jd.kernels.jd_lora_apply`: one shrink GEMM, the Σ step gathered by slot, one expand GEMM per projection,
  whatever the number of adapters in the batch.

Tensor parallelism (one store per rank): a column-parallel layer (output sharded, full input) keeps the rows of U
that produce this rank's output block and all of V; a row-parallel layer (input sharded, output all-reduced by vLLM)
keeps the rows of V that read this rank's input block and all of U, so each rank adds the partial update
`U Σ V_kᵀ x_k` before the all-reduce and the sum is the full update, with no extra communication. Σ is replicated.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from peft_jd.core import BASE_SLOT, BasesConfig, SharedBases, SlotAllocator
from peft_jd.core.errors import BasesMismatchError, ShapeMismatchError
from peft_jd.kernels import jd_lora_apply, select_backend


# Under the "vllm" logger, so that messages appear in vLLM's own log output.
logger = logging.getLogger(f"vllm.{__name__}")

__all__ = ["COLUMN", "ROW", "JDLayer", "JDProjection", "JDStore", "LayerTarget"]

# How a layer is split over tensor-parallel ranks: output columns (full input), or input columns (partial output).
COLUMN = "column"
ROW = "row"
UNSHARDED = (0, 1)


@dataclass(frozen=True)
class LayerTarget:
    """Where a vLLM linear layer's output columns come from, in the bases' module keys, and this rank's share of it.

    Shards are `(index, count)`: block `index` of `count` equal blocks of the full dimension (`(0, 1)`: all of it).

    Args:
        name: The layer's module name in the vLLM model (e.g. `model.layers.0.self_attn.qkv_proj`).
        module_keys: Bases module key of each packed part, in output order (one entry for an unpacked layer).
        output_sizes: Output columns of each part on this rank (sum = the layer's local output size).
        parallel: `COLUMN` (this rank computes an output block from the full input; also unsharded layers) or `ROW`
            (this rank reads an input block; its partial outputs are summed over ranks by vLLM's all-reduce).
        output_shards: Per part, the output block this rank holds (column-parallel). Empty: all unsharded.
        input_shard: The input block this rank reads (row-parallel).
        input_size: Input columns the layer reads on this rank, when known (checked against the bases).
    """

    name: str
    module_keys: tuple[str, ...]
    output_sizes: tuple[int, ...]
    parallel: str = COLUMN
    output_shards: tuple[tuple[int, int], ...] = ()
    input_shard: tuple[int, int] = UNSHARDED
    input_size: Optional[int] = None

    def __post_init__(self):
        if self.parallel not in (COLUMN, ROW):
            raise ValueError(f"layer {self.name!r}: parallel must be {COLUMN!r} or {ROW!r}, not {self.parallel!r}")
        if len(self.output_sizes) != len(self.module_keys):
            raise ValueError(f"layer {self.name!r}: {len(self.module_keys)} parts but {len(self.output_sizes)} sizes")
        if self.output_shards and len(self.output_shards) != len(self.module_keys):
            raise ValueError(f"layer {self.name!r}: {len(self.module_keys)} parts but {len(self.output_shards)} "
                             "output shards")
        sharded_output = any(tuple(shard) != UNSHARDED for shard in self.output_shards)
        if (self.parallel == ROW and sharded_output) or (self.parallel == COLUMN and self.input_shard != UNSHARDED):
            raise ValueError(f"layer {self.name!r}: a {self.parallel}-parallel layer cannot shard its "
                             f"{'output' if self.parallel == ROW else 'input'}")
        for index, count in (*self.output_shards, self.input_shard):
            if not 0 <= index < count:
                raise ValueError(f"layer {self.name!r}: shard {index} of {count} does not exist")

    def output_shard(self, part: int) -> tuple[int, int]:
        return tuple(self.output_shards[part]) if self.output_shards else UNSHARDED


@dataclass
class JDProjection:
    """Bases modules applied together to output columns `[start, end)` of a layer, with their Σ rows.

    `parts` lists `(module_key, offset)`, the part's first column in the projection's rank dimension: a
    single-cluster packed layer (q, k, v) is fused into one projection whose `V` concatenates the parts' `V` (rank
    `r_q + r_k + r_v`: budgeted collections give modules their own ranks), whose `U` is block diagonal and whose Σ rows
    are block diagonal —
    one shrink GEMM, one Σ step and one expand GEMM for the whole layer. Otherwise each part is its own projection.
    """

    parts: tuple[tuple[str, int], ...]
    start: int
    end: int
    U: torch.Tensor
    V: torch.Tensor
    sigma: torch.Tensor
    cluster: torch.Tensor
    rank: int

    @property
    def module_key(self) -> str:
        return "+".join(key for key, _ in self.parts)


@dataclass
class JDLayer:
    """The projections of one vLLM linear layer covered by the bases (empty until bases are attached)."""

    target: LayerTarget
    projections: list[JDProjection] = field(default_factory=list)
    out_features: int = 0


class JDStore:
    """Shared bases, Σ stacks and per-token slots of one worker process.

    Args:
        initial_capacity: Σ rows allocated up front (slot 0 included); grows by doubling.
        device: Where the tensors live (the model's device).
        dtype: Dtype of U and V (the model's dtype).
        sigma_dtype: Dtype of the Σ stacks and of the Σ step. Default: bfloat16 for a bfloat16 model (the precision
            its weights and vLLM's own LoRA weights have; it halves the Σ memory and speeds up the CPU Σ step),
            float32 otherwise (float16 Σ could overflow).
    """

    def __init__(self, initial_capacity: int = 64, device: torch.device | str = "cpu", dtype=torch.float32,
                 sigma_dtype: Optional[torch.dtype] = None):
        self.layers: list[JDLayer] = []
        self.allocator = SlotAllocator(initial_capacity)
        self.device = torch.device(device)
        self.dtype = dtype
        self.sigma_dtype = sigma_dtype or (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
        self.bases: Optional[SharedBases] = None
        self.backend = select_backend(self.device)
        self.token_slots: Optional[torch.Tensor] = None
        self._padded: Optional[torch.Tensor] = None
        self._rows = self.allocator.capacity

    # -- layers and bases ------------------------------------------------------------------------------------------

    def add_layer(self, target: LayerTarget) -> int:
        """Registers a vLLM linear layer; returns its id (passed to `apply`)."""
        self.layers.append(JDLayer(target, out_features=sum(target.output_sizes)))
        if self.bases is not None:
            self._attach_layer(self.layers[-1])
        return len(self.layers) - 1

    def attach_bases(self, bases: SharedBases) -> None:
        """Places U and V of every covered module once; a second, different bases collection is refused."""
        if self.bases is not None:
            if self.bases.key != bases.key or self.bases.fingerprint != bases.fingerprint:
                raise BasesMismatchError(
                    f"this vLLM server serves the JD collection with bases {self.bases.key.describe()}; bases "
                    f"{bases.key.describe()} cannot be added beside them. Start one server per collection."
                )
            return
        self.bases = bases
        try:
            covered = sum(self._attach_layer(layer) for layer in self.layers)
        except Exception:
            self._detach()
            raise
        if covered == 0:
            self._detach()
            raise BasesMismatchError(
                f"none of the modules of bases {bases.key.describe()} "
                f"(e.g. {next(iter(bases.config.modules), '-')!r}) matches a linear layer of the served model; the "
                "collection was compressed for another base model."
            )
        logger.info("JD-LoRA: bases %s attached to %d projections", bases.key.describe(), covered)

    def _detach(self) -> None:
        # A refused collection leaves nothing half-placed: the next adapter's bases start from a clean store.
        self.bases = None
        for layer in self.layers:
            layer.projections.clear()

    def _attach_layer(self, layer: JDLayer) -> int:
        config: BasesConfig = self.bases.config
        target = layer.target
        covered, start = [], 0
        for part, (module_key, size) in enumerate(zip(target.module_keys, target.output_sizes)):
            if module_key in config.modules:
                U, V = self.bases.module(module_key)
                # Narrowed before placing: a rank holds only its blocks on the device.
                U = _block(U, target.output_shard(part), size, "out", module_key, target)
                V = _block(V, target.input_shard, target.input_size, "in", module_key, target)
                covered.append((module_key, start, start + size, U.to(self.device, self.dtype),
                                V.to(self.device, self.dtype)))
            start += size
        if len(covered) > 1 and all(U.shape[0] == 1 for _, _, _, U, _ in covered):
            layer.projections.append(self._fused(covered, layer.out_features, config))
        else:
            for key, begin, end, U, V in covered:
                layer.projections.append(self._projection(((key, 0),), begin, end, U.contiguous(), V.contiguous(),
                                                          U.shape[-1], config.sigma_type))
        return len(covered)

    def _projection(self, parts, start, end, U, V, rank, sigma_type) -> JDProjection:
        sigma_shape = (self._rows, rank, rank) if sigma_type == "full" else (self._rows, rank)
        sigma = torch.zeros(sigma_shape, dtype=self.sigma_dtype, device=self.device)
        cluster = torch.zeros(self._rows, dtype=torch.int64, device=self.device)
        return JDProjection(parts, start, end, U, V, sigma, cluster, rank)

    def _fused(self, covered, out_features: int, config: BasesConfig) -> JDProjection:
        offsets = [0]
        for *_, U_part, _ in covered:
            offsets.append(offsets[-1] + U_part.shape[-1])
        in_features, rank = covered[0][4].shape[1], offsets[-1]
        U = torch.zeros(1, out_features, rank, dtype=self.dtype, device=self.device)
        V = torch.empty(1, in_features, rank, dtype=self.dtype, device=self.device)
        for offset, (_, begin, end, U_part, V_part) in zip(offsets, covered):
            U[0, begin:end, offset : offset + U_part.shape[-1]] = U_part[0]
            V[0, :, offset : offset + V_part.shape[-1]] = V_part[0]
        parts = tuple((key, offset) for offset, (key, *_) in zip(offsets, covered))
        return self._projection(parts, 0, out_features, U, V, rank, config.sigma_type)

    def projections(self):
        for layer in self.layers:
            yield from layer.projections

    # -- adapters --------------------------------------------------------------------------------------------------

    def slot_of(self, adapter_key: str) -> Optional[int]:
        return self.allocator.slot_of.get(adapter_key)

    def load(self, adapter_key: str, sigmas: Mapping[str, torch.Tensor], clusters: Mapping[str, int],
             scaling: float = 1.0) -> int:
        """Writes an adapter's Σ rows (already validated against the bases) and returns its slot.

        Args:
            adapter_key: Identity of this adapter version (name, id and path).
            sigmas: Module key → Σ; modules without one get a zero Σ.
            clusters: Module key → cluster.
            scaling: The adapter's scaling, folded into its Σ rows.
        """
        slot = self.allocator.acquire(adapter_key)
        self._grow(self.allocator.capacity)
        for proj in self.projections():
            row = proj.sigma[slot]
            row.zero_()
            proj.cluster[slot] = 0
            for module_key, offset in proj.parts:
                sigma = sigmas.get(module_key)
                if sigma is None:
                    continue
                window = slice(offset, offset + sigma.shape[0])
                target = row[window, window] if row.dim() == 2 else row[window]
                target.copy_(sigma.to(torch.float32) * scaling)
                # Fused projections have one cluster; an unfused one has one part.
                proj.cluster[slot] = int(clusters[module_key])
        return slot

    def unload(self, adapter_key: str) -> None:
        """Frees an adapter's slot (its rows are overwritten by the next load)."""
        slot = self.allocator.slot_of.get(adapter_key)
        if slot is not None:
            for proj in self.projections():
                proj.sigma[slot].zero_()
            self.allocator.release(adapter_key)

    def _grow(self, rows: int) -> None:
        if rows <= self._rows:
            return
        for proj in self.projections():
            extra = rows - proj.sigma.shape[0]
            proj.sigma = torch.cat([proj.sigma, proj.sigma.new_zeros((extra, *proj.sigma.shape[1:]))])
            proj.cluster = torch.cat([proj.cluster, proj.cluster.new_zeros(extra)])
        self._rows = rows

    def nbytes(self) -> dict[str, int]:
        """Resident bytes: `bases` (U, V placed once) and `sigma` (all Σ rows)."""
        projections = list(self.projections())
        return {
            "bases": sum(p.U.nbytes + p.V.nbytes for p in projections),
            "sigma": sum(p.sigma.nbytes + p.cluster.nbytes for p in projections),
        }

    # -- forward ---------------------------------------------------------------------------------------------------

    def set_token_slots(self, slots: Optional[Sequence[int] | torch.Tensor]) -> None:
        """Slot of every token of the next forward, in vLLM's flattened token order; `None` when no JD row."""
        self._padded = None
        if slots is None:
            self.token_slots = None
            return
        slots = torch.as_tensor(slots, dtype=torch.int64)
        self.token_slots = slots.to(self.device) if bool((slots != BASE_SLOT).any()) else None

    def _slots_for(self, rows: int) -> Optional[torch.Tensor]:
        slots = self.token_slots
        if slots is None or rows == slots.numel():
            return slots
        if rows < slots.numel():
            return None
        # vLLM may pad the batch (rows past the scheduled tokens are discarded): the padding takes the base slot.
        if self._padded is None or self._padded.numel() != rows:
            self._padded = torch.cat([slots, slots.new_zeros(rows - slots.numel())])
        return self._padded

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer_id: int) -> None:
        """Adds the JD-LoRA update of every token to `y` in place (`y`, `x`: `(..., out)`, `(..., in)`)."""
        if self.token_slots is None:
            return
        layer = self.layers[layer_id]
        if not layer.projections:
            return
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        rows = x2.shape[0]
        slots = self._slots_for(rows)
        if slots is None:
            return
        for proj in layer.projections:
            if proj.start == 0 and proj.end == layer.out_features:
                jd_lora_apply(y2, x2, proj.U, proj.V, proj.sigma, slots, proj.cluster, 1.0, backend=self.backend)
            else:
                delta = torch.zeros(rows, proj.end - proj.start, dtype=y2.dtype, device=y2.device)
                jd_lora_apply(delta, x2, proj.U, proj.V, proj.sigma, slots, proj.cluster, 1.0, backend=self.backend)
                y2[:, proj.start : proj.end] += delta


def _block(tensor: torch.Tensor, shard: tuple[int, int], local_size: Optional[int], side: str, module_key: str,
           target: LayerTarget) -> torch.Tensor:
    """Block `shard` = `(index, count)` of `count` equal blocks of a `(c, features, r)` basis along its features.

    Raises `ShapeMismatchError` when the bases' size does not split into `count` blocks of the layer's local size.
    """
    index, count = shard
    full = tensor.shape[1]
    if full % count == 0 and local_size in (None, full // count):
        return tensor.narrow(1, index * (full // count), full // count)
    what = f"bases module {module_key!r} has {side}_features={full}"
    if count == 1:
        raise ShapeMismatchError(
            f"{what}, but vLLM layer {target.name!r} gives it {local_size} {side}put columns; the collection was "
            "compressed for another base model."
        )
    raise ShapeMismatchError(
        f"{what}, which does not split into {count} equal tensor-parallel blocks of {local_size} {side}put columns "
        f"(vLLM layer {target.name!r}); the collection was compressed for another base model, or its "
        f"{side}_features do not divide by the tensor-parallel size: serve it with another --tensor-parallel-size."
    )
