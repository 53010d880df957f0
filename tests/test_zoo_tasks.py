"""The zoo task suite: size, determinism, 80/10/10 splits, and answers checked against independent rules."""

from __future__ import annotations

import datetime
import re

import pytest

from peft_jd.zoo.tasks import DEMO_TASKS, TASKS, get_task, make_splits, select_tasks, task_names
from peft_jd.zoo.tasks_numbers import number_to_words


def test_suite_has_at_least_40_distinct_tasks_in_three_categories():
    assert len(TASKS) >= 40
    assert len(set(task_names())) == len(TASKS)
    assert {t.category for t in TASKS.values()} == {"text", "numbers", "classify"}
    assert len({t.instruction for t in TASKS.values()}) == len(TASKS)
    assert set(DEMO_TASKS) <= set(TASKS)


def test_splits_are_deterministic_and_seed_dependent():
    first, again, other = (
        make_splits("acronym", 0, 100),
        make_splits("acronym", 0, 100),
        make_splits("acronym", 1, 100),
    )
    assert first.train == again.train and first.val == again.val and first.test == again.test
    assert first.train != other.train


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_disjoint_80_10_10_with_short_answers(name):
    splits = make_splits(name, seed=0, num_examples=200)
    total = len(splits.train) + len(splits.val) + len(splits.test)
    assert total >= 150, f"{name} has too few distinct inputs"
    assert len(splits.train) == round(0.8 * total) and len(splits.val) == round(0.1 * total)
    examples = [e for part in (splits.train, splits.val, splits.test) for e in part]
    assert len({e.input for e in examples}) == len(examples)
    for example in examples:
        assert example.answer and example.answer == example.answer.strip() and len(example.answer) <= 40
        assert "\n" not in example.input


def _answers(name: str, n: int = 60):
    return make_splits(name, seed=3, num_examples=n).train


def test_text_answers_follow_their_rules():
    for e in _answers("reverse_words"):
        assert e.answer.split() == e.input.split()[::-1]
    for e in _answers("sort_words"):
        assert e.answer.split() == sorted(e.input.split())
    for e in _answers("acronym"):
        assert e.answer == "".join(w[0] for w in e.input.split()).upper()
    for e in _answers("remove_vowels"):
        assert e.answer == re.sub("[aeiou]", "", e.input)
    for e in _answers("camel_case"):
        words = e.input.split()
        assert e.answer == words[0] + "".join(w.title() for w in words[1:])
    for e in _answers("snake_case"):
        assert e.answer == e.input.lower().replace(" ", "_")
    for e in _answers("count_words"):
        assert int(e.answer) == len(e.input.split())
    for e in _answers("longest_word"):
        assert len(e.answer) == max(len(w) for w in e.input.split())


def test_number_answers_follow_their_rules():
    for e in _answers("add"):
        a, b = e.input.split(" + ")
        assert int(e.answer) == int(a) + int(b)
    for e in _answers("multiply"):
        a, b = e.input.split(" * ")
        assert int(e.answer) == int(a) * int(b)
    for e in _answers("parity"):
        assert e.answer == ("even" if int(e.input) % 2 == 0 else "odd")
    for e in _answers("sort_numbers"):
        assert e.answer.split() == [str(v) for v in sorted(map(int, e.input.split()))]
    for e in _answers("date_format"):
        date = datetime.date.fromisoformat(e.input)
        assert e.answer == date.strftime("%d/%m/%Y")
    for e in _answers("month_of_date"):
        assert e.answer == datetime.date.fromisoformat(e.input).strftime("%B")
    for e in _answers("weekday_after"):
        day, offset = re.fullmatch(r"(\w+) \+ (\d+) days", e.input).groups()
        monday = datetime.date(2024, 1, 1)  # a Monday
        start = monday + datetime.timedelta(
            days=["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"].index(day)
        )
        assert e.answer == (start + datetime.timedelta(days=int(offset))).strftime("%A")
    for e in _answers("round_to_ten"):
        n = int(e.input)
        assert abs(int(e.answer) - n) <= 5 and int(e.answer) % 10 == 0
        assert n % 10 != 5 or int(e.answer) == n + 5


def test_number_words_known_values_and_roundtrip():
    known = {
        0: "zero",
        7: "seven",
        15: "fifteen",
        40: "forty",
        42: "forty-two",
        100: "one hundred",
        342: "three hundred forty-two",
        910: "nine hundred ten",
        999: "nine hundred ninety-nine",
    }
    for n, words in known.items():
        assert number_to_words(n) == words
    assert len({number_to_words(n) for n in range(1000)}) == 1000
    for e in _answers("words_to_digits"):
        assert number_to_words(int(e.answer)) == e.input
    with pytest.raises(ValueError):
        number_to_words(1000)


def test_classification_labels_match_the_sentence_content():
    from peft_jd.zoo.words import ANIMALS, NEGATIVE_ADJECTIVES, POSITIVE_ADJECTIVES

    for e in _answers("sentiment"):
        adjective = e.input.rstrip(".").split()[-1]
        assert e.answer == ("positive" if adjective in POSITIVE_ADJECTIVES else "negative")
        assert adjective in POSITIVE_ADJECTIVES + NEGATIVE_ADJECTIVES
    for e in _answers("animal_or_vehicle"):
        thing = e.input.split(" saw a ")[1].split()[0]
        assert e.answer == ("animal" if thing in ANIMALS else "vehicle")
    for e in _answers("count_occurrences"):
        target, rest = e.input.split(": ")
        assert int(e.answer) == rest.split().count(target)
    for e in _answers("extract_city"):
        assert f" to {e.answer} on " in e.input


def test_labels_are_balanced_enough_to_need_learning():
    for name in ("parity", "sentiment", "animal_or_vehicle", "is_sorted", "contains_word"):
        answers = [e.answer for e in make_splits(name, 0, 200).train]
        majority = max(answers.count(a) for a in set(answers)) / len(answers)
        assert majority < 0.7, name


def test_select_tasks_and_errors():
    assert [t.name for t in select_tasks(["parity", "acronym"])] == ["parity", "acronym"]
    first = select_tasks(count=6)
    assert len(first) == 6 and {t.category for t in first} == {"text", "numbers", "classify"}
    assert len(select_tasks()) == len(TASKS)
    with pytest.raises(KeyError, match="unknown zoo task 'nope'.*available tasks"):
        get_task("nope")
    with pytest.raises(ValueError, match="at least 10"):
        make_splits("parity", num_examples=5)
