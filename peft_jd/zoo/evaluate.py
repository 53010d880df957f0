"""Evaluation of a collection through the mixed-batch path: every generation batch mixes many adapters.

Metrics: exact match (after stripping surrounding whitespace; case-sensitive) and Rouge-L F1 on lower-cased
alphanumeric tokens (the tokenization of `rouge-score`, without stemming), implemented here with an LCS.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .model import encode_answer, encode_prompt, end_of_turn_id
from .tasks import TaskSplits


BASE_ADAPTER = "__base__"
_TOKEN_RE = re.compile(r"[a-z0-9]+")


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the prediction equals the reference up to surrounding whitespace."""
    return prediction.strip() == reference.strip()


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b):
            current.append(previous[j] + 1 if token_a == token_b else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F1 between two strings (0.0 when either has no alphanumeric token, as in `rouge-score`)."""
    pred_tokens = _TOKEN_RE.findall(prediction.lower())
    ref_tokens = _TOKEN_RE.findall(reference.lower())
    if not pred_tokens or not ref_tokens:
        return 0.0
    lcs = _lcs_length(pred_tokens, ref_tokens)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred_tokens), lcs / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class Request:
    """One evaluation prompt: the task (= adapter name) it belongs to, the user message and the reference."""

    task: str
    message: str
    answer: str


def build_requests(
    splits: Mapping[str, TaskSplits], split: str = "test", per_task: int | None = None
) -> list[Request]:
    """Requests of every task, interleaved round-robin so that any consecutive slice mixes many adapters.

    Args:
        splits: Task splits by adapter name.
        split: `"train"`, `"val"` or `"test"`.
        per_task: Keep at most this many examples per task.
    """
    queues = []
    for name, task_splits in splits.items():
        examples = getattr(task_splits, split)[:per_task]
        queues.append([Request(name, task_splits.task.user_message(e), e.answer) for e in examples])
    requests = []
    for index in range(max((len(q) for q in queues), default=0)):
        requests.extend(q[index] for q in queues if index < len(q))
    return requests


def answer_token_budget(tokenizer, requests: Sequence[Request], slack: int = 2) -> int:
    """`max_new_tokens` for a request set: the longest reference answer (with `<|im_end|>`) plus `slack`."""
    return max(len(encode_answer(tokenizer, r.answer)) for r in requests) + slack


def _left_pad(tokenizer, messages: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [encode_prompt(tokenizer, m) for m in messages]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    messages: Sequence[str],
    adapter_names: Sequence[str] | None,
    max_new_tokens: int,
    min_new_tokens: int = 0,
) -> tuple[list[str], int]:
    """Greedy answers for one batch, each row through its own adapter (`adapter_names`), and the tokens generated.

    Args:
        model: A `PeftModel` (LoRA or JD-LoRA) or a plain transformers model (then `adapter_names` must be `None`).
        tokenizer: The model's tokenizer.
        messages: User messages.
        adapter_names: One adapter name per row (`"__base__"` for the base model), or `None` for the active adapter.
        max_new_tokens: Generation cap.
        min_new_tokens: Force at least this many tokens (for throughput measurements with equal work).
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = _left_pad(tokenizer, messages, device)
    kwargs = {} if adapter_names is None else {"adapter_names": list(adapter_names)}
    eos = end_of_turn_id(tokenizer)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    new_tokens = output[:, input_ids.shape[1] :]
    generated = int(((new_tokens != tokenizer.pad_token_id) & (new_tokens != eos)).sum())
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [t.strip() for t in texts], generated


@dataclass
class EvalResult:
    """Predictions and scores of one model/collection on a request set.

    Args:
        predictions: One prediction per request, in request order.
        per_task: Task → `{"exact_match", "rouge_l", "n"}`.
        seconds: Wall time of generation.
        tokens: Generated tokens (excluding padding and `<|im_end|>`).
    """

    predictions: list[str]
    per_task: dict[str, dict[str, float]]
    seconds: float
    tokens: int

    def mean(self, metric: str = "exact_match") -> float:
        """Unweighted mean over tasks of `metric`."""
        return sum(m[metric] for m in self.per_task.values()) / max(1, len(self.per_task))

    def agreement(self, other: EvalResult) -> float:
        """Fraction of requests on which both produced exactly the same prediction."""
        pairs = list(zip(self.predictions, other.predictions))
        return sum(a == b for a, b in pairs) / max(1, len(pairs))


def score(requests: Sequence[Request], predictions: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-task exact match and Rouge-L of `predictions` against the references of `requests`."""
    sums: dict[str, list[float]] = {}
    for request, prediction in zip(requests, predictions):
        entry = sums.setdefault(request.task, [0.0, 0.0, 0])
        entry[0] += exact_match(prediction, request.answer)
        entry[1] += rouge_l(prediction, request.answer)
        entry[2] += 1
    return {task: {"exact_match": em / n, "rouge_l": rl / n, "n": n} for task, (em, rl, n) in sums.items()}


def evaluate(
    model,
    tokenizer,
    requests: Sequence[Request],
    adapter_for: Mapping[str, str] | str | None = None,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    progress: bool = True,
    desc: str = "evaluate",
    use_adapter_names: bool = True,
) -> EvalResult:
    """Generates an answer for every request in mixed batches and scores them.

    Args:
        model: A `PeftModel` (LoRA or JD-LoRA) or a plain model.
        tokenizer: Its tokenizer.
        requests: Requests, ideally interleaved across tasks (`build_requests`).
        adapter_for: Task → adapter name, or a single name used for every row (e.g. `"__base__"`). Default (`None`):
            each task's own adapter, named like the task.
        batch_size: Rows per generation batch.
        max_new_tokens: Generation cap; defaults to `answer_token_budget(tokenizer, requests)`.
        progress: Show a progress bar.
        desc: Progress bar label.
        use_adapter_names: Pass `adapter_names` (mixed batches); `False` runs the model's active adapter(s) or a
            plain model.
    """
    max_new_tokens = max_new_tokens or answer_token_budget(tokenizer, requests)
    predictions: list[str] = []
    tokens, start = 0, time.perf_counter()
    for offset in tqdm(
        range(0, len(requests), batch_size), desc=desc, unit="batch", leave=False, disable=not progress
    ):
        chunk = requests[offset : offset + batch_size]
        if not use_adapter_names:
            names = None
        elif isinstance(adapter_for, str):
            names = [adapter_for] * len(chunk)
        else:
            names = [(adapter_for or {}).get(r.task, r.task) for r in chunk]
        texts, generated = generate_batch(model, tokenizer, [r.message for r in chunk], names, max_new_tokens)
        predictions.extend(texts)
        tokens += generated
    seconds = time.perf_counter() - start
    return EvalResult(predictions, score(requests, predictions), seconds, tokens)


def measure_throughput(
    model,
    tokenizer,
    messages: Sequence[str],
    adapter_names: Sequence[str] | None,
    new_tokens: int = 16,
    repeats: int = 1,
) -> float:
    """Generated tokens per second for one batch, with exactly `new_tokens` tokens per row (equal work per run).

    Args:
        model: The model to time.
        tokenizer: Its tokenizer.
        messages: The batch's user messages.
        adapter_names: One adapter per row (mixed batch), or `None` for the model's active adapter.
        new_tokens: Tokens generated per row.
        repeats: Timed runs after one warm-up run; the fastest counts.
    """
    generate_batch(model, tokenizer, messages[:2], None if adapter_names is None else adapter_names[:2], 2, 2)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        generate_batch(model, tokenizer, messages, adapter_names, new_tokens, min_new_tokens=new_tokens)
        best = min(best, time.perf_counter() - start)
    return len(messages) * new_tokens / best
