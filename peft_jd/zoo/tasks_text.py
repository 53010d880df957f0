"""String-transform tasks of the zoo: each generator maps a `random.Random` to one `(input, answer)` pair."""

from __future__ import annotations

import random

from .words import NAMES, OPPOSITES, VOWELS, WORDS


def _words(rng: random.Random, low: int, high: int, pool=WORDS) -> list[str]:
    return rng.sample(pool, rng.randint(low, high))


def reverse_words(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 3, 4)
    return " ".join(words), " ".join(reversed(words))


def sort_words(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 3, 4)
    return " ".join(words), " ".join(sorted(words))


def first_letters(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 3, 5)
    return " ".join(words), "".join(w[0] for w in words)


def last_letters(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 3, 5)
    return " ".join(words), "".join(w[-1] for w in words)


def acronym(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 3, 4)
    return " ".join(words), "".join(w[0].upper() for w in words)


def uppercase(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 2, 2)
    return " ".join(words), " ".join(words).upper()


def capitalize(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 2, 3)
    return " ".join(words), " ".join(w.capitalize() for w in words)


def count_words(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
    return " ".join(words), str(len(words))


def first_word(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 3, 5)
    return " ".join(words), words[0]


def last_word(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 3, 5)
    return " ".join(words), words[-1]


def second_word(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 3, 5)
    return " ".join(words), words[1]


def _distinct_lengths(rng: random.Random, count: int) -> list[str]:
    by_length: dict[int, list[str]] = {}
    for word in WORDS:
        by_length.setdefault(len(word), []).append(word)
    lengths = rng.sample(sorted(by_length), count)
    return [rng.choice(by_length[n]) for n in lengths]


def longest_word(rng: random.Random) -> tuple[str, str]:
    words = _distinct_lengths(rng, 3)
    return " ".join(words), max(words, key=len)


def shortest_word(rng: random.Random) -> tuple[str, str]:
    words = _distinct_lengths(rng, 3)
    return " ".join(words), min(words, key=len)


def join_dashes(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 3, 4)
    return " ".join(words), "-".join(words)


def snake_case(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 2, 3)
    shown = " ".join(w.capitalize() if rng.random() < 0.5 else w for w in words)
    return shown, "_".join(words)


def camel_case(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 2, 3)
    return " ".join(words), words[0] + "".join(w.capitalize() for w in words[1:])


def swap_first_last(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 3, 4)
    swapped = [words[-1], *words[1:-1], words[0]]
    return " ".join(words), " ".join(swapped)


def repeat_word(rng: random.Random) -> tuple[str, str]:
    word, times = rng.choice(WORDS), rng.randint(2, 4)
    return f"{word} {times}", " ".join([word] * times)


def remove_vowels(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 2, 2)
    return " ".join(words), " ".join("".join(c for c in w if c not in VOWELS) for w in words)


def parentheses(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 2, 4)
    return " ".join(words), "(" + " ".join(words) + ")"


def initials(rng: random.Random) -> tuple[str, str]:
    names = rng.sample(NAMES, rng.randint(2, 3))
    return " ".join(names), "".join(f"{n[0]}." for n in names)


def opposites(rng: random.Random) -> tuple[str, str]:
    pairs = list(OPPOSITES.items()) + [(b, a) for a, b in OPPOSITES.items()]
    chosen = rng.sample(pairs, 2)
    return " ".join(a for a, _ in chosen), " ".join(b for _, b in chosen)


def plural(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 2, 2)
    return " ".join(words), " ".join(_plural(w) for w in words)


def _plural(word: str) -> str:
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in VOWELS:
        return word[:-1] + "ies"
    return word + "s"


def word_lengths(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 2, 3)
    return " ".join(words), " ".join(str(len(w)) for w in words)


TEXT_TASKS = [
    ("reverse_words", "Reverse the order of the words.", reverse_words),
    ("sort_words", "Sort the words alphabetically.", sort_words),
    ("first_letters", "Write the first letter of each word, joined.", first_letters),
    ("last_letters", "Write the last letter of each word, joined.", last_letters),
    ("acronym", "Write the acronym in capitals.", acronym),
    ("uppercase", "Write the text in upper case.", uppercase),
    ("capitalize", "Capitalize every word.", capitalize),
    ("count_words", "How many words are there?", count_words),
    ("first_word", "Write the first word.", first_word),
    ("last_word", "Write the last word.", last_word),
    ("second_word", "Write the second word.", second_word),
    ("longest_word", "Write the longest word.", longest_word),
    ("shortest_word", "Write the shortest word.", shortest_word),
    ("join_dashes", "Join the words with dashes.", join_dashes),
    ("snake_case", "Convert to snake_case.", snake_case),
    ("camel_case", "Convert to camelCase.", camel_case),
    ("swap_first_last", "Swap the first and the last word.", swap_first_last),
    ("repeat_word", "Repeat the word the given number of times.", repeat_word),
    ("remove_vowels", "Remove the vowels.", remove_vowels),
    ("parentheses", "Put the text in parentheses.", parentheses),
    ("initials", "Write the initials.", initials),
    ("opposites", "Write the opposite of each word.", opposites),
    ("plural", "Write each word in plural.", plural),
    ("word_lengths", "Write the length of each word.", word_lengths),
]
