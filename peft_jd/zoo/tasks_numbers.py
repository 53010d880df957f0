"""Arithmetic, number-formatting and calendar tasks of the zoo (generators: `random.Random` → `(input, answer)`)."""

from __future__ import annotations

import random

from .words import MONTHS, ONES, TEENS, TENS, WEEKDAYS


def number_to_words(n: int) -> str:
    """English words for 0 ≤ n ≤ 999, e.g. 342 → "three hundred forty-two"."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_to_words supports 0..999, got {n}")
    hundreds, rest = divmod(n, 100)
    parts = [f"{ONES[hundreds]} hundred"] if hundreds else []
    if rest or not parts:
        if rest < 10:
            parts.append(ONES[rest])
        elif rest < 20:
            parts.append(TEENS[rest - 10])
        else:
            tens, ones = divmod(rest, 10)
            parts.append(TENS[tens] + (f"-{ONES[ones]}" if ones else ""))
    return " ".join(parts)


def _numbers(rng: random.Random, count: int, low: int = 1, high: int = 99) -> list[int]:
    return rng.sample(range(low, high + 1), count)


def add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a} + {b}", str(a + b)


def subtract(rng: random.Random) -> tuple[str, str]:
    a, b = sorted(_numbers(rng, 2, 10, 99), reverse=True)
    return f"{a} - {b}", str(a - b)


def multiply(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    return f"{a} * {b}", str(a * b)


def maximum(rng: random.Random) -> tuple[str, str]:
    values = _numbers(rng, rng.randint(3, 5))
    return " ".join(map(str, values)), str(max(values))


def minimum(rng: random.Random) -> tuple[str, str]:
    values = _numbers(rng, rng.randint(3, 5))
    return " ".join(map(str, values)), str(min(values))


def sort_numbers(rng: random.Random) -> tuple[str, str]:
    values = _numbers(rng, rng.randint(3, 4))
    return " ".join(map(str, values)), " ".join(map(str, sorted(values)))


def sum_digits(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(100, 9999)
    return str(n), str(sum(int(d) for d in str(n)))


def parity(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(1, 9999)
    return str(n), "even" if n % 2 == 0 else "odd"


def successor(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(1, 998)
    return str(n), str(n + 1)


def double(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(1, 499)
    return str(n), str(2 * n)


def larger(rng: random.Random) -> tuple[str, str]:
    a, b = _numbers(rng, 2, 1, 999)
    return f"{a} or {b}", str(max(a, b))


def digits_to_words(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 999)
    return str(n), number_to_words(n)


def words_to_digits(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 999)
    return number_to_words(n), str(n)


def round_to_ten(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 999)
    # Half-up rounding, stated in the task rather than Python's banker's rounding.
    return str(n), str((n + 5) // 10 * 10)


def last_digit(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(10, 10**6)
    return str(n), str(n % 10)


def count_digits(rng: random.Random) -> tuple[str, str]:
    length = rng.randint(1, 9)
    n = rng.randint(10 ** (length - 1), 10**length - 1)
    return str(n), str(length)


def is_sorted(rng: random.Random) -> tuple[str, str]:
    values = _numbers(rng, rng.randint(3, 5))
    if rng.random() < 0.5:
        values.sort()
    return " ".join(map(str, values)), "yes" if values == sorted(values) else "no"


def weekday_after(rng: random.Random) -> tuple[str, str]:
    day, offset = rng.randrange(7), rng.randint(1, 30)
    return f"{WEEKDAYS[day]} + {offset} days", WEEKDAYS[(day + offset) % 7]


def date_format(rng: random.Random) -> tuple[str, str]:
    year, month, day = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return f"{year}-{month:02d}-{day:02d}", f"{day:02d}/{month:02d}/{year}"


def month_of_date(rng: random.Random) -> tuple[str, str]:
    year, month, day = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return f"{year}-{month:02d}-{day:02d}", MONTHS[month - 1]


NUMBER_TASKS = [
    ("add", "Add the numbers.", add),
    ("subtract", "Subtract the numbers.", subtract),
    ("multiply", "Multiply the numbers.", multiply),
    ("maximum", "Write the largest number.", maximum),
    ("minimum", "Write the smallest number.", minimum),
    ("sort_numbers", "Sort the numbers in increasing order.", sort_numbers),
    ("sum_digits", "Write the sum of the digits.", sum_digits),
    ("parity", "Is the number even or odd?", parity),
    ("successor", "Write the next number.", successor),
    ("double_number", "Double the number.", double),
    ("larger", "Which number is larger?", larger),
    ("digits_to_words", "Write the number in words.", digits_to_words),
    ("words_to_digits", "Write the number in digits.", words_to_digits),
    ("round_to_ten", "Round to the nearest ten (halves up).", round_to_ten),
    ("last_digit", "Write the last digit.", last_digit),
    ("count_digits", "How many digits does the number have?", count_digits),
    ("is_sorted", "Are the numbers in increasing order? Answer yes or no.", is_sorted),
    ("weekday_after", "Which weekday is it?", weekday_after),
    ("date_format", "Rewrite the date as DD/MM/YYYY.", date_format),
    ("month_of_date", "Write the month of the date.", month_of_date),
]
