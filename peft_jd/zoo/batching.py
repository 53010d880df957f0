"""Left-padded batches whose answers end every row, so the loss needs logits for the last few positions only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import encode_answer, encode_prompt
from .tasks import Example, Task


@dataclass
class AnswerBatch:
    """A training/validation batch.

    Args:
        input_ids: `(B, T)` prompt + answer + `<|im_end|>`, padded on the left.
        attention_mask: `(B, T)` 1 for real tokens.
        position_ids: `(B, T)` positions counted from each row's first real token (as `generate` does).
        answer_mask: `(B, K)` which of the last `K` tokens of each row are answer tokens (the loss targets).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    answer_mask: torch.Tensor

    @property
    def answer_width(self) -> int:
        return self.answer_mask.shape[1]


def make_batch(tokenizer, task: Task, examples: Sequence[Example]) -> AnswerBatch:
    """Tokenizes `examples` of `task` into a left-padded `AnswerBatch`."""
    rows, answer_lengths = [], []
    for example in examples:
        answer = encode_answer(tokenizer, example.answer)
        rows.append(encode_prompt(tokenizer, task.user_message(example)) + answer)
        answer_lengths.append(len(answer))
    width, answer_width = max(map(len, rows)), max(answer_lengths)
    pad_id = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    answer_mask = torch.zeros((len(rows), answer_width), dtype=torch.bool)
    for i, (row, answer_length) in enumerate(zip(rows, answer_lengths)):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
        answer_mask[i, answer_width - answer_length :] = True
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return AnswerBatch(input_ids, attention_mask, position_ids, answer_mask)


def answer_loss(model, batch: AnswerBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over answer tokens, and per row whether greedy decoding reproduces the whole answer.

    Teacher-forced argmax over all answer tokens (including `<|im_end|>`) being correct is exactly the condition for
    greedy generation to output the answer, so the second value is the greedy exact match without generating.

    Returns:
        `(loss, row_correct)` with `row_correct` a `(B,)` bool tensor.
    """
    width = batch.answer_width
    # Only the last width+1 positions predict answer tokens; skipping the rest saves most of the LM-head cost.
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=width + 1,
    ).logits[:, :-1]
    targets = batch.input_ids[:, -width:]
    mask = batch.answer_mask
    loss = F.cross_entropy(logits[mask].float(), targets[mask])
    row_correct = ((logits.argmax(-1) == targets) | ~mask).all(-1)
    return loss, row_correct
