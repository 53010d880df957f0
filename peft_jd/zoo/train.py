"""LoRA training for the zoo with standard PEFT, with early stopping and a cache of trained adapters.

Each adapter is cached under `<cache>/<task>-<seed>-<key>`, where `key` hashes the training settings, the task
definition and the base model identity, so a rerun with the same settings loads instead of training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm

from ..core import atomic_directory
from .batching import answer_loss, make_batch
from .model import ZooModel
from .tasks import TASKS_VERSION, Example, Task, make_splits


TRAIN_INFO_NAME = "train_info.json"


def default_cache_dir() -> Path:
    """`$PEFT_JD_ZOO_CACHE`, else `~/.cache/peft-jd/zoo`."""
    return Path(os.environ.get("PEFT_JD_ZOO_CACHE", Path.home() / ".cache" / "peft-jd" / "zoo"))


@dataclass(frozen=True)
class TrainSettings:
    """LoRA training settings (defaults: the paper's adapter config, sized for a 2-core CPU).

    Args:
        r: LoRA rank.
        lora_alpha: LoRA alpha (scaling `lora_alpha / r`).
        lora_dropout: Dropout on the LoRA input.
        target_modules: Adapted modules.
        learning_rate: Peak AdamW learning rate (linear warm-up, then linear decay to 10% at `max_steps`).
        batch_size: Training examples per step.
        max_steps: Upper bound on optimizer steps.
        warmup_steps: Warm-up steps.
        eval_every: Steps between validation passes.
        patience: Validation passes without improvement before stopping.
        val_examples: Validation examples scored per pass (teacher-forced greedy exact match + loss).
        num_examples: Examples drawn per task before the 80/10/10 split.
        seed: Seed of the data splits, the LoRA initialisation and the batch order.
        target_val_accuracy: Stop as soon as the validation exact match reaches this value.
    """

    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    learning_rate: float = 3e-3
    batch_size: int = 8
    max_steps: int = 80
    warmup_steps: int = 3
    eval_every: int = 10
    patience: int = 3
    val_examples: int = 32
    num_examples: int = 500
    seed: int = 0
    target_val_accuracy: float = 1.0

    def cache_key(self, task: Task, model_id: str) -> str:
        """12-hex-digit hash of everything that determines the trained adapter."""
        payload = {
            "settings": asdict(self),
            "task": [task.name, task.instruction, TASKS_VERSION],
            "model": model_id,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

    def lora_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )


@dataclass
class TrainResult:
    """Outcome of training (or loading from the cache) one task's adapter.

    Args:
        task: Task name.
        path: Adapter directory (PEFT LoRA format).
        cached: Whether it was loaded from the cache instead of trained now.
        steps: Optimizer steps taken.
        train_seconds: Wall time of the original training.
        val_accuracy: Best validation exact match (teacher-forced greedy).
        val_loss: Validation loss at that point.
        history: Per validation pass: step, loss, accuracy.
    """

    task: str
    path: Path
    cached: bool
    steps: int
    train_seconds: float
    val_accuracy: float
    val_loss: float
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def adapter_cache_path(task: Task, settings: TrainSettings, model_id: str, cache_dir: Path | None = None) -> Path:
    """Directory where the adapter of `task` trained with `settings` on `model_id` is (or will be) cached."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_dir / f"{task.name}-{settings.seed}-{settings.cache_key(task, model_id)}"


def load_cached(path: Path, task: Task) -> TrainResult | None:
    """The cached result at `path`, or `None` if there is no complete cached adapter there."""
    info_path = path / TRAIN_INFO_NAME
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text(encoding="utf-8"))
    return TrainResult(
        task=task.name,
        path=path,
        cached=True,
        steps=info["steps"],
        train_seconds=info["train_seconds"],
        val_accuracy=info["val_accuracy"],
        val_loss=info["val_loss"],
        history=info.get("history", []),
    )


def _task_seed(task: Task, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"train:{task.name}:{seed}".encode()).digest()[:4], "big")


def _batches(examples: list[Example], batch_size: int, rng: random.Random):
    """Endless stream of batches, reshuffling at every epoch."""
    order = list(examples)
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield order[start : start + batch_size]
        if len(order) < batch_size:
            yield order


@torch.no_grad()
def validate(model, tokenizer, task: Task, examples: Sequence[Example], batch_size: int) -> tuple[float, float]:
    """`(mean loss, exact match)` on `examples`, computed from one teacher-forced forward per batch."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            loss, row_correct = answer_loss(model, make_batch(tokenizer, task, chunk))
            total_loss += loss.item() * len(chunk)
            correct += int(row_correct.sum())
    finally:
        model.train(was_training)
    return total_loss / len(examples), correct / len(examples)


def _lr_factor(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.max_steps - settings.warmup_steps)
    return 1.0 - 0.9 * min(1.0, progress)


def _fit(
    peft_model: PeftModel,
    tokenizer,
    task: Task,
    train: list[Example],
    val: list[Example],
    settings: TrainSettings,
    progress: bool,
) -> dict:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, settings))
    batches = _batches(train, settings.batch_size, random.Random(_task_seed(task, settings.seed)))
    best = {"score": (-1.0, -math.inf), "state": None, "step": 0, "loss": math.inf, "accuracy": 0.0}
    history, stale, step = [], 0, 0
    bar = tqdm(total=settings.max_steps, desc=f"train {task.name}", leave=False, disable=not progress)
    peft_model.train()
    while step < settings.max_steps:
        loss, _ = answer_loss(peft_model, make_batch(tokenizer, task, next(batches)))
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % settings.eval_every and step != settings.max_steps:
            continue
        val_loss, val_accuracy = validate(peft_model, tokenizer, task, val, settings.batch_size * 2)
        history.append({"step": step, "train_loss": loss.item(), "val_loss": val_loss, "val_accuracy": val_accuracy})
        bar.set_postfix(loss=f"{loss.item():.3f}", val_em=f"{val_accuracy:.2f}")
        score = (val_accuracy, -val_loss)
        if score > best["score"]:
            state = {k: v.detach().clone() for k, v in peft_model.named_parameters() if v.requires_grad}
            best.update(score=score, state=state, step=step, loss=val_loss, accuracy=val_accuracy)
            stale = 0
        else:
            stale += 1
        if val_accuracy >= settings.target_val_accuracy or stale >= settings.patience:
            break
    bar.close()
    with torch.no_grad():
        named = dict(peft_model.named_parameters())
        for name, value in best["state"].items():
            named[name].copy_(value)
    peft_model.eval()
    return {
        "steps": step,
        "best_step": best["step"],
        "val_loss": best["loss"],
        "val_accuracy": best["accuracy"],
        "history": history,
    }


def train_adapter(
    zoo: ZooModel,
    task: Task,
    settings: TrainSettings | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    force: bool = False,
) -> TrainResult:
    """Trains a LoRA for `task` on `zoo.model` (or loads it from the cache) and returns where it is stored.

    The base model is wrapped with PEFT for the duration of training and restored (unloaded) afterwards.

    Args:
        zoo: Base model, tokenizer and model identity.
        task: The task to learn.
        settings: Training settings; defaults to `TrainSettings()`.
        cache_dir: Adapter cache root; defaults to `default_cache_dir()`.
        progress: Show a progress bar.
        force: Retrain even if a cached adapter exists.
    """
    settings = settings or TrainSettings()
    path = adapter_cache_path(task, settings, zoo.model_id, cache_dir)
    cached = None if force else load_cached(path, task)
    if cached is not None:
        return cached
    splits = make_splits(task, settings.seed, settings.num_examples)
    torch.manual_seed(_task_seed(task, settings.seed))
    peft_model = get_peft_model(zoo.model, settings.lora_config())
    try:
        start = time.perf_counter()
        fit = _fit(
            peft_model, zoo.tokenizer, task, splits.train, splits.val[: settings.val_examples], settings, progress
        )
        seconds = time.perf_counter() - start
        info = {
            "task": task.name,
            "train_seconds": seconds,
            "settings": asdict(settings),
            "model_id": zoo.model_id,
            "tasks_version": TASKS_VERSION,
            **fit,
        }
        with atomic_directory(path) as tmp:
            peft_model.save_pretrained(str(tmp))
            (tmp / TRAIN_INFO_NAME).write_text(json.dumps(info, indent=2), encoding="utf-8")
    finally:
        zoo.model = peft_model.unload()
    return TrainResult(
        task=task.name,
        path=path,
        cached=False,
        steps=fit["steps"],
        train_seconds=seconds,
        val_accuracy=fit["val_accuracy"],
        val_loss=fit["val_loss"],
        history=fit["history"],
    )


def train_zoo(
    zoo: ZooModel,
    tasks: Sequence[Task],
    settings: TrainSettings | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, TrainResult]:
    """Trains (or loads) one adapter per task; returns results by task name, in the order of `tasks`."""
    results: dict[str, TrainResult] = {}
    with tqdm(tasks, desc="LoRA zoo", unit="task", disable=not progress) as bar:
        for task in bar:
            bar.set_postfix(task=task.name)
            results[task.name] = train_adapter(zoo, task, settings, cache_dir, progress=progress)
    return results
