"""Zoo metrics and batching: Rouge-L vs a brute-force LCS, answer-only loss vs HF's labelled loss, greedy check."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from peft_jd.zoo.batching import answer_loss, make_batch
from peft_jd.zoo.evaluate import build_requests, exact_match, rouge_l, score
from peft_jd.zoo.model import encode_answer, encode_prompt, load_tiny_model
from peft_jd.zoo.tasks import Example, get_task, make_splits


def _brute_force_lcs(a: list[str], b: list[str]) -> int:
    for length in range(min(len(a), len(b)), 0, -1):
        subsequences = {tuple(c) for c in itertools.combinations(a, length)}
        if any(tuple(c) in subsequences for c in itertools.combinations(b, length)):
            return length
    return 0


def test_rouge_l_matches_brute_force_lcs_f1():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(1, 6))]
        b = [rng.choice("abcd") for _ in range(rng.randint(1, 6))]
        lcs = _brute_force_lcs(a, b)
        expected = 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))  # F1 of P = lcs/|a|, R = lcs/|b|
        assert rouge_l(" ".join(a), " ".join(b)) == pytest.approx(expected)


def test_rouge_l_tokenization_and_edge_cases():
    assert rouge_l("The cat, sat!", "the CAT sat") == pytest.approx(1.0)
    assert rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)
    assert rouge_l("", "abc") == 0.0 and rouge_l("...", "...") == 0.0
    assert exact_match("  GRJ\n", "GRJ") and not exact_match("grj", "GRJ") and not exact_match("GRJ.", "GRJ")


def test_build_requests_interleaves_tasks_and_score_groups_by_task():
    splits = {name: make_splits(name, 0, 40) for name in ("parity", "acronym", "sentiment")}
    requests = build_requests(splits, per_task=3)
    assert len(requests) == 9
    for start in range(0, 9, 3):
        assert {r.task for r in requests[start : start + 3]} == set(splits)
    assert [r.answer for r in requests if r.task == "parity"] == [e.answer for e in splits["parity"].test[:3]]
    predictions = [r.answer if r.task == "parity" else "wrong" for r in requests]
    scores = score(requests, predictions)
    assert scores["parity"]["exact_match"] == 1.0 and scores["acronym"]["exact_match"] == 0.0
    assert scores["sentiment"]["n"] == 3


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_tiny_model(seed=1)


def test_answer_loss_equals_hf_labelled_loss_with_right_padding(tiny):
    task = get_task("reverse_words")
    examples = make_splits(task, 0, 40).train[:5]
    loss, _ = answer_loss(tiny.model, make_batch(tiny.tokenizer, task, examples))
    # Reference: right padding, full logits, labels -100 everywhere except the answer tokens.
    rows, labels = [], []
    for e in examples:
        prompt = encode_prompt(tiny.tokenizer, task.user_message(e))
        answer = encode_answer(tiny.tokenizer, e.answer)
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    with torch.no_grad():
        logits = tiny.model(input_ids=input_ids, attention_mask=mask).logits
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), label_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss.detach(), reference, rtol=1e-4, atol=1e-5)


def test_teacher_forced_correctness_is_greedy_exact_match(tiny, monkeypatch):
    """A row counts as correct exactly when greedy generation reproduces all of its answer tokens."""
    task = get_task("first_word")
    examples = [Example(e.input, f"answer-{i}") for i, e in enumerate(make_splits(task, 0, 40).train[:8])]
    continuations = {}
    for i, e in enumerate(examples):
        ids = torch.tensor([encode_prompt(tiny.tokenizer, task.user_message(e))])
        out = tiny.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=3 + i % 3,
            do_sample=False,
            pad_token_id=tiny.tokenizer.pad_token_id,
            eos_token_id=-1,
        )
        greedy = out[0, ids.shape[1] :].tolist()
        if i % 2:  # corrupt one token: greedy decoding does not produce this answer
            position = i % len(greedy)
            greedy[position] = (greedy[position] + 1) % len(tiny.tokenizer)
        continuations[e.answer] = greedy
    # Answers of different lengths given directly as token ids (the tiny random model never emits <|im_end|>).
    monkeypatch.setattr("peft_jd.zoo.batching.encode_answer", lambda tokenizer, answer: continuations[answer])
    with torch.no_grad():
        _, correct = answer_loss(tiny.model, make_batch(tiny.tokenizer, task, examples))
    assert correct.tolist() == [i % 2 == 0 for i in range(len(examples))]
