"""`peft-jd calibrate`: load the base model with transformers and collect its input statistics."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..core import UsageError
from .calibration import InputStatistics, collect_input_statistics


def tokenized_batches(tokenizer, texts: Sequence[str], max_length: int, batch_size: int,
                      chat_template: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of `texts` (as user turns of the chat template when `chat_template`)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        if chat_template:
            chunk = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                   add_generation_prompt=True) for text in chunk]
        encoded = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        yield {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def calibrate_from_texts(model_name_or_path: str, texts: Sequence[str], target_modules: Sequence[str],
                         gguf_file: str | None = None, max_length: int = 256, batch_size: int = 8,
                         chat_template: bool = False) -> InputStatistics:
    """Input statistics of a transformers causal LM on `texts` (fp32, CPU or the default device)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not texts:
        raise UsageError("no calibration texts given.")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, torch_dtype=torch.float32, **kwargs).eval()
    batches = tokenized_batches(tokenizer, texts, max_length, batch_size, chat_template)
    return collect_input_statistics(model, batches, target_modules, model_name=model_name_or_path)
