"""Classification and extraction tasks on templated sentences (generators: `random.Random` → `(input, answer)`)."""

from __future__ import annotations

import random

from .words import (
    ANIMALS,
    CITIES,
    FOOD_WORDS,
    NAMES,
    NEGATIVE_ADJECTIVES,
    POSITIVE_ADJECTIVES,
    REVIEW_NOUNS,
    SPORT_WORDS,
    VEHICLES,
    WEATHER_WORDS,
    WEEKDAYS,
    WORDS,
)


_DEGREES = ["", "really ", "very ", "quite ", "truly ", "rather "]
_PLACES = ["park", "river", "station", "farm", "bridge", "market", "road", "beach"]


def sentiment(rng: random.Random) -> tuple[str, str]:
    positive = rng.random() < 0.5
    adjective = rng.choice(POSITIVE_ADJECTIVES if positive else NEGATIVE_ADJECTIVES)
    sentence = f"The {rng.choice(REVIEW_NOUNS)} was {rng.choice(_DEGREES)}{adjective}."
    return sentence, "positive" if positive else "negative"


def animal_or_vehicle(rng: random.Random) -> tuple[str, str]:
    animal = rng.random() < 0.5
    thing = rng.choice(ANIMALS if animal else VEHICLES)
    sentence = f"{rng.choice(NAMES)} saw a {thing} near the {rng.choice(_PLACES)}."
    return sentence, "animal" if animal else "vehicle"


def topic(rng: random.Random) -> tuple[str, str]:
    label, pool = rng.choice([("sports", SPORT_WORDS), ("food", FOOD_WORDS), ("weather", WEATHER_WORDS)])
    first, second = rng.sample(pool, 2)
    sentence = f"{rng.choice(NAMES)} talked about the {first} and the {second}."
    return sentence, label


def question_or_statement(rng: random.Random) -> tuple[str, str]:
    name, city = rng.choice(NAMES), rng.choice(CITIES)
    templates = [
        ("Did {n} go to {c}", "question", "?"),
        ("Is {n} from {c}", "question", "?"),
        ("Will {n} visit {c}", "question", "?"),
        ("{n} went to {c}", "statement", "."),
        ("{n} is from {c}", "statement", "."),
        ("{n} will visit {c}", "statement", "."),
    ]
    template, label, mark = rng.choice(templates)
    # Half the sentences drop their final mark so the label must come from the word order.
    return template.format(n=name, c=city) + (mark if rng.random() < 0.5 else ""), label


def extract_city(rng: random.Random) -> tuple[str, str]:
    name, city, day = rng.choice(NAMES), rng.choice(CITIES), rng.choice(WEEKDAYS)
    return f"{name} flew to {city} on {day}.", city


def extract_name(rng: random.Random) -> tuple[str, str]:
    name, city, day = rng.choice(NAMES), rng.choice(CITIES), rng.choice(WEEKDAYS)
    if rng.random() < 0.5:
        return f"On {day}, {name} arrived in {city}.", name
    return f"In {city}, {name} rested on {day}.", name


def extract_day(rng: random.Random) -> tuple[str, str]:
    name, city, day = rng.choice(NAMES), rng.choice(CITIES), rng.choice(WEEKDAYS)
    return f"{name} left {city} on {day}.", day


def contains_word(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 5)
    present = rng.random() < 0.5
    target = rng.choice(words[:4]) if present else words[4]
    return f"{target}: {' '.join(words[:4])}", "yes" if present else "no"


def count_occurrences(rng: random.Random) -> tuple[str, str]:
    target, other, third = rng.sample(WORDS, 3)
    times = rng.randint(1, 4)
    words = [target] * times + [rng.choice([other, third]) for _ in range(rng.randint(1, 4))]
    rng.shuffle(words)
    return f"{target}: {' '.join(words)}", str(times)


def odd_one_out(rng: random.Random) -> tuple[str, str]:
    pool, odd_pool = (ANIMALS, VEHICLES) if rng.random() < 0.5 else (VEHICLES, ANIMALS)
    words = rng.sample(pool, 3) + [rng.choice(odd_pool)]
    odd = words[-1]
    rng.shuffle(words)
    return " ".join(words), odd


CLASSIFY_TASKS = [
    ("sentiment", "Is the review positive or negative?", sentiment),
    ("animal_or_vehicle", "Did they see an animal or a vehicle?", animal_or_vehicle),
    ("topic", "Is the topic sports, food or weather?", topic),
    ("question_or_statement", "Is it a question or a statement?", question_or_statement),
    ("extract_city", "Which city?", extract_city),
    ("extract_name", "Who is the person?", extract_name),
    ("extract_day", "On which day?", extract_day),
    ("contains_word", "Is the word before the colon in the list? Answer yes or no.", contains_word),
    ("count_occurrences", "How many times does the word before the colon appear after it?", count_occurrences),
    ("odd_one_out", "Which word does not belong?", odd_one_out),
]
