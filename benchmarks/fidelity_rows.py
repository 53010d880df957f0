"""One configuration of `benchmarks/fidelity.py` compressed, evaluated and summarised as a result row.

Quality is measured through the mixed-batch path against the LoRAs' own predictions; memory is counted both in
parameters per adapter and in bytes per adapter (the shared part amortised over the adapters that share it, the
LoRAs at fp16).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from peft_jd.compression.sizes import REFERENCE_BYTES
from peft_jd.zoo import (
    compress_collection,
    evaluate,
    jd_parameters,
    load_jd_collection,
    load_lora_collection,
    lora_parameters,
    lora_reconstruction_errors,
    reconstruction_errors,
    release,
)
from peft_jd.zoo.evaluate import EvalResult, score


@dataclass(frozen=True)
class Setting:
    """One compressed configuration: method, rank (or a budget in bytes per adapter, the ranks then allocated per
    module), clusters, and how many adapters (first n tasks) share it."""

    method: str
    rank: int | None
    clusters: int
    n: int
    budget: str | None = None

    @property
    def label(self) -> str:
        size = f"b{self.budget}" if self.budget else f"r{self.rank}"
        return f"{self.method}-{size}-c{self.clusters}-n{self.n}"


@dataclass(frozen=True)
class Context:
    """What every compressed configuration of a run is evaluated against.

    Args:
        zoo: The `ZooModel`.
        loras: Name → PEFT LoRA folder, in task order.
        requests: The test requests of all tasks.
        lora: The LoRAs' `EvalResult` on `requests` (the reference).
        work: Folder for the compressed collections.
        batch_size: Generation batch size.
        lora_params: Mean parameters of one LoRA.
        storage: `sigma_dtype` and `bases_dtype` of the JD collections.
    """

    zoo: object
    loras: dict[str, Path]
    requests: list
    lora: EvalResult
    work: Path
    batch_size: int
    lora_params: float
    storage: dict[str, str]


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def row(
    method: str,
    rank: int | None,
    clusters: int,
    n: int,
    params: float,
    ratio: float | None,
    err2: float | None,
    summary: dict,
    **extra,
) -> dict:
    """One result row: configuration, memory per adapter (bases amortized), reconstruction error and quality."""
    return {
        "method": method,
        "rank": rank,
        "clusters": clusters,
        "n": n,
        "params_per_adapter": params,
        "memory_ratio": ratio,
        "err2": err2,
        **extra,
        **summary,
    }


def summary(result: EvalResult, lora: EvalResult, names: list[str]) -> dict:
    em = sum(result.per_task[n]["exact_match"] for n in names) / len(names)
    rouge = sum(result.per_task[n]["rouge_l"] for n in names) / len(names)
    lora_em = sum(lora.per_task[n]["exact_match"] for n in names) / len(names)
    lora_rouge = sum(lora.per_task[n]["rouge_l"] for n in names) / len(names)
    return {
        "exact_match": em,
        "rouge_l": rouge,
        # Retention is undefined (None) when the LoRAs themselves score 0.
        "em_retention": em / lora_em if lora_em else None,
        "rouge_retention": rouge / lora_rouge if lora_rouge else None,
        "agreement": result.agreement(lora),
        "per_task_em": {n: result.per_task[n]["exact_match"] for n in names},
        "eval_s": result.seconds,
    }


def lora_format_row(
    ctx: Context, method: str, rank: int, label: str, approx: dict[str, Path], params: float | None = None, **extra
) -> dict:
    """Evaluates approximations stored as PEFT LoRAs (name → dir, every adapter); `extra` goes into the row.

    Parameters are counted from the files unless given, bytes at fp16 unless `bytes_per_adapter` is given: a
    LoRA-format approximation is served like the LoRAs.
    """
    names = list(ctx.loras)
    model = load_lora_collection(ctx.zoo, approx)
    result = evaluate(model, ctx.zoo.tokenizer, ctx.requests, None, ctx.batch_size, desc=label)
    release(ctx.zoo, model)
    if params is None:
        params = sum(lora_parameters(p) for p in approx.values()) / len(approx)
    extra.setdefault("bytes_per_adapter", REFERENCE_BYTES * params)
    extra.setdefault("bytes_ratio", REFERENCE_BYTES * ctx.lora_params / extra["bytes_per_adapter"])
    errors = lora_reconstruction_errors(ctx.loras, approx)
    err2 = sum(errors.values()) / len(errors)
    return row(
        method, rank, 0, len(names), params, ctx.lora_params / params, err2, summary(result, ctx.lora, names), **extra
    )


def peer_row(ctx: Context, method: str, budget: str, label: str, adapters: dict[str, Path], report: dict) -> dict:
    """A peer's reconstructions evaluated; its memory as its `peer_report.json` counts it."""
    bytes_per_adapter = report["bytes_per_adapter"]
    return lora_format_row(
        ctx,
        method,
        report["setting"]["num_components"],
        label,
        adapters,
        params=report["own_values_per_adapter"] + report["shared_values"] / report["num_adapters"],
        bytes_per_adapter=bytes_per_adapter,
        bytes_ratio=REFERENCE_BYTES * ctx.lora_params / bytes_per_adapter if bytes_per_adapter else None,
        budget=budget,
        setting=report["setting"],
        value_dtype=report["value_dtype"],
        compress_s=report["compress_s"],
    )


def run_setting(zoo, setting: Setting, ctx: Context) -> dict:
    """Compresses the first `setting.n` LoRAs with peft-jd and evaluates the collection on their requests."""
    names = list(ctx.loras)[: setting.n]
    subset = {n: ctx.loras[n] for n in names}
    out_dir = ctx.work / setting.label
    options = dict(ctx.storage, **({"budget": setting.budget} if setting.budget else {}))
    start = time.perf_counter()
    compressed = compress_collection(subset, out_dir, setting.method, setting.rank, setting.clusters, **options)
    compress_s = time.perf_counter() - start
    own = [r for r in ctx.requests if r.task in subset]
    model = load_jd_collection(zoo, out_dir, names)
    result = evaluate(model, zoo.tokenizer, own, None, ctx.batch_size, desc=setting.label)
    release(zoo, model)
    errors = reconstruction_errors(subset, out_dir)
    params = jd_parameters(out_dir, names)
    memory = compressed["sizes"]["bytes"]
    extra = {}
    if setting.budget:
        ranks = [m.get("rank", compressed["settings"]["rank"]) for m in compressed["modules"].values()]
        extra = {
            "budget": setting.budget,
            "module_ranks": {"min": min(ranks), "mean": statistics.fmean(ranks), "max": max(ranks)},
        }
    if "fallback_error" in ctx.storage:
        extra["fallback_pairs"] = sum(len(m.get("fallback", [])) for m in compressed["modules"].values())
    return row(
        setting.method,
        setting.rank,
        setting.clusters,
        setting.n,
        params["amortized"],
        ctx.lora_params / params["amortized"],
        sum(errors.values()) / len(errors),
        summary(result, restrict(ctx.lora, ctx.requests, own), names),
        sigma_params=params["sigma"],
        bases_params=params["bases"],
        # As report.json measures them: Σ and bases at their storage dtypes, bases amortised, vs the LoRAs at fp16.
        bytes_per_adapter=memory["bytes_per_adapter"],
        bytes_ratio=memory["memory_ratio"],
        compress_s=compress_s,
        **ctx.storage,
        **extra,
    )


def restrict(result: EvalResult, requests: list, subset_requests: list) -> EvalResult:
    """The LoRA result restricted to the requests of a subset of tasks (same order as `subset_requests`)."""
    keep = {id(r) for r in subset_requests}
    predictions = [p for r, p in zip(requests, result.predictions) if id(r) in keep]
    return EvalResult(predictions, score(subset_requests, predictions), result.seconds, result.tokens)
