"""The zoo's task suite: procedurally generated instruction tasks with short, exactly checkable answers.

Every task is a fixed instruction plus a generator of `(input, answer)` pairs. `make_splits` draws distinct inputs
deterministically from `(task, seed)` (the same on every machine and Python process) and splits them 80/10/10 into
train/validation/test, as the paper did with Natural Instructions.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .tasks_classify import CLASSIFY_TASKS
from .tasks_numbers import NUMBER_TASKS
from .tasks_text import TEXT_TASKS


# Part of every adapter cache key: bump it whenever a generator, instruction or word list changes.
TASKS_VERSION = 1
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

# Diverse tasks that a rank-16 LoRA learns within a few dozen steps; used by `peft-jd demo`.
DEMO_TASKS = (
    "acronym",
    "reverse_words",
    "parity",
    "sentiment",
    "extract_city",
    "digits_to_words",
    "date_format",
    "animal_or_vehicle",
)


@dataclass(frozen=True)
class Example:
    """One instance of a task: the text after the instruction, and the exact expected answer."""

    input: str
    answer: str


@dataclass(frozen=True)
class Task:
    """An instruction task.

    Args:
        name: Identifier, also the adapter name.
        category: `"text"`, `"numbers"` or `"classify"`.
        instruction: The fixed instruction shown before every input.
        generator: Draws one `(input, answer)` pair from a `random.Random`.
    """

    name: str
    category: str
    instruction: str
    generator: Callable[[random.Random], tuple[str, str]]

    def user_message(self, example: Example) -> str:
        """The user turn of the prompt: instruction, newline, input."""
        return f"{self.instruction}\n{example.input}"


@dataclass(frozen=True)
class TaskSplits:
    """Disjoint train/validation/test examples of one task."""

    task: Task
    train: list[Example]
    val: list[Example]
    test: list[Example]


def _build_registry() -> dict[str, Task]:
    registry: dict[str, Task] = {}
    for category, entries in (("text", TEXT_TASKS), ("numbers", NUMBER_TASKS), ("classify", CLASSIFY_TASKS)):
        for name, instruction, generator in entries:
            if name in registry:
                raise RuntimeError(f"duplicate zoo task name {name!r}")
            registry[name] = Task(name=name, category=category, instruction=instruction, generator=generator)
    return registry


TASKS: dict[str, Task] = _build_registry()


def task_names() -> list[str]:
    """Names of all tasks, in registry order (text, numbers, classification)."""
    return list(TASKS)


def get_task(name: str) -> Task:
    """The task called `name`; raises `KeyError` listing the available tasks otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown zoo task {name!r}; available tasks: {', '.join(TASKS)}") from None


def select_tasks(names: Sequence[str] | None = None, count: int | None = None) -> list[Task]:
    """Tasks by name, or the first `count` tasks of the registry interleaved across categories.

    Args:
        names: Explicit task names (take precedence).
        count: Number of tasks when `names` is not given; `None` means all.
    """
    if names:
        return [get_task(n) for n in names]
    by_category: dict[str, list[Task]] = {}
    for task in TASKS.values():
        by_category.setdefault(task.category, []).append(task)
    # Round-robin over categories so that a prefix of the zoo is as diverse as the whole.
    ordered: list[Task] = []
    queues = list(by_category.values())
    while any(queues):
        for queue in queues:
            if queue:
                ordered.append(queue.pop(0))
    return ordered if count is None else ordered[:count]


def _rng_for(task_name: str, seed: int) -> random.Random:
    # Python's hash() of a str is salted per process; sha256 keeps splits identical across runs and machines.
    digest = hashlib.sha256(f"peft-jd-zoo:{TASKS_VERSION}:{task_name}:{seed}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def make_splits(task: Task | str, seed: int = 0, num_examples: int = 500) -> TaskSplits:
    """Draws up to `num_examples` examples with distinct inputs and splits them 80/10/10.

    Args:
        task: A `Task` or a task name.
        seed: Seed of the draw; the same `(task, seed, num_examples)` always gives the same splits.
        num_examples: Examples to draw (fewer if the task has fewer distinct inputs).

    Returns:
        The `TaskSplits`; each split holds at least one example.
    """
    task = get_task(task) if isinstance(task, str) else task
    if num_examples < 10:
        raise ValueError(f"num_examples must be at least 10 to make 80/10/10 splits, got {num_examples}.")
    rng = _rng_for(task.name, seed)
    examples: dict[str, Example] = {}
    for _ in range(num_examples * 20):
        text, answer = task.generator(rng)
        examples.setdefault(text, Example(text, answer))
        if len(examples) == num_examples:
            break
    ordered = list(examples.values())
    rng.shuffle(ordered)
    n_train = round(len(ordered) * SPLIT_FRACTIONS[0])
    n_val = round(len(ordered) * SPLIT_FRACTIONS[1])
    return TaskSplits(task, ordered[:n_train], ordered[n_train : n_train + n_val], ordered[n_train + n_val :])
