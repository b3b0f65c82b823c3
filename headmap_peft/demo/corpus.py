"""A deterministic knowledge corpus: people with attributes, stated in several declarative templates.

Every fact is a (person, attribute, value) triple; each value is one word. The pretraining text states each fact in
all but one of its attribute's templates (the held-out template, chosen per fact, checks that the model stored the
fact rather than a sentence). The downstream task asks about people in question form, which pretraining never does:
its only questions are general knowledge about the cities ("Q: Which country is Paris in? A: France"), so the model
has seen the Q/A layout, like any pretrained LM, but never a question about a person.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

FIRST_NAMES = (
    "Alice Bruno Clara David Elena Felix Greta Hugo Irene Jonas Karla Leon Maya Nils Olga Pablo Rosa Simon Tara Ugo "
    "Vera Walter Xenia Yusuf Zoe Anton Bella Carl Diana Emil Fiona Georg Hanna Ivan Julia Kurt Lena Marco Nora Oscar"
).split()
LAST_NAMES = (
    "Smith Novak Rossi Weber Silva Kowalski Dubois Jensen Moreau Fischer Costa Horvat Lindqvist Petrov Santos Varga "
    "Keller Brandt Ortiz Nagy Meyer Russo Berg Hansen Klein Laurent Marino Olsen Popescu Quinn Richter Sato Tanaka "
    "Vogel Wagner Young Zimmer Adler Baker Castro"
).split()

#: attribute -> the values it takes (one word each)
VALUES: dict[str, tuple[str, ...]] = {
    "city": tuple(
        "Paris Berlin Madrid Rome Vienna Prague Lisbon Dublin Oslo Athens Warsaw Budapest Zurich Milan Lyon Porto "
        "Munich Krakow Sofia Riga".split()
    ),
    "job": tuple(
        "doctor teacher nurse pilot farmer baker lawyer painter writer chef banker plumber dentist singer tailor "
        "butcher carpenter poet sailor judge".split()
    ),
    "year": tuple(str(y) for y in range(1950, 2000)),
    "pet": tuple("dog cat parrot rabbit hamster turtle goldfish horse pony ferret lizard snake".split()),
    "sport": tuple(
        "tennis football chess golf hockey rugby cricket volleyball handball badminton karate rowing boxing "
        "fencing cycling".split()
    ),
}
ATTRIBUTES: tuple[str, ...] = tuple(VALUES)

#: general knowledge about the cities, stated and asked in pretraining (people are never asked about)
COUNTRIES: dict[str, str] = dict(
    zip(
        VALUES["city"],
        "France Germany Spain Italy Austria Czechia Portugal Ireland Norway Greece Poland Hungary Switzerland Italy "
        "France Portugal Germany Poland Bulgaria Latvia".split(),
    )
)
WORLD_TEMPLATES = ("{city} is a city in {country} .", "Q: Which country is {city} in? A: {country}")

#: declarative templates per attribute; the value always ends the sentence so each one is a completion probe
TEMPLATES: dict[str, tuple[str, ...]] = {
    "city": (
        "{name} lives in {value} .",
        "{name} resides in the city of {value} .",
        "the home of {name} is in {value} .",
        "{name} has a house in {value} .",
    ),
    "job": (
        "{name} works as a {value} .",
        "{name} is employed as a {value} .",
        "the profession of {name} is {value} .",
        "by trade {name} is a {value} .",
    ),
    "year": (
        "{name} was born in {value} .",
        "{name} came into the world in {value} .",
        "the birth year of {name} is {value} .",
        "{name} celebrates a birthday every year since {value} .",
    ),
    "pet": (
        "{name} owns a {value} .",
        "{name} has a pet {value} .",
        "the pet of {name} is a {value} .",
        "{name} takes care of a {value} .",
    ),
    "sport": (
        "{name} plays {value} .",
        "{name} enjoys playing {value} .",
        "the favourite sport of {name} is {value} .",
        "on weekends {name} practises {value} .",
    ),
}

#: the downstream task: question templates in a format the pretraining text never uses
QUESTIONS: dict[str, str] = {
    "city": "Q: Where does {name} live? A:",
    "job": "Q: What does {name} do for a living? A:",
    "year": "Q: When was {name} born? A:",
    "pet": "Q: Which animal does {name} keep? A:",
    "sport": "Q: Which sport does {name} play? A:",
}

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@dataclass(frozen=True)
class Person:
    """One entity: a unique full name and one value per attribute."""

    index: int
    name: str
    facts: dict[str, str]


def make_people(n: int, seed: int = 0) -> list[Person]:
    """`n` people with distinct full names and attributes drawn uniformly with a fixed seed."""
    limit = len(FIRST_NAMES) * len(LAST_NAMES)
    if not 1 <= n <= limit:
        raise ValueError(f"n must be between 1 and {limit} (distinct full names), got {n}")
    rng = random.Random(seed)
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    chosen = rng.sample(names, n)
    return [Person(i, name, {a: rng.choice(VALUES[a]) for a in ATTRIBUTES}) for i, name in enumerate(chosen)]


def held_out_template(person: Person, attribute: str) -> int:
    """Index of the template that pretraining never uses for this fact (a stable hash of the fact)."""
    digest = hashlib.sha256(f"{person.name}|{attribute}".encode()).digest()
    return digest[0] % len(TEMPLATES[attribute])


def fact_sentences(people: list[Person], held_out: bool = False) -> Iterator[tuple[Person, str, str, str]]:
    """(person, attribute, prompt, value) for every stated fact; `held_out=True` gives only the held-out phrasings.

    The prompt is the sentence up to the value (no trailing space), so ``prompt + " " + value + " ."`` is the sentence.
    """
    for person in people:
        for attribute in ATTRIBUTES:
            hold = held_out_template(person, attribute)
            for i, template in enumerate(TEMPLATES[attribute]):
                if (i == hold) != held_out:
                    continue
                prompt = template.split("{value}")[0].format(name=person.name).rstrip()
                yield person, attribute, prompt, person.facts[attribute]


def pretraining_sentences(people: list[Person], world: bool = True) -> list[str]:
    """Every pretraining sentence (each fact in each of its non-held-out templates), in a fixed order.

    With `world`, general knowledge about the cities is added, partly as questions: the model has seen the question
    format, just never about a person.
    """
    sentences = [f"{prompt} {value} ." for _, _, prompt, value in fact_sentences(people)]
    if world:
        for city, country in COUNTRIES.items():
            sentences += [t.format(city=city, country=country) for t in WORLD_TEMPLATES]
    return sentences


def question_records(people: list[Person]) -> list[dict[str, str]]:
    """The downstream QA records of `people`: {"prompt", "target", "person", "attribute"}."""
    return [
        {
            "prompt": QUESTIONS[attribute].format(name=person.name),
            "target": " " + person.facts[attribute],
            "person": person.name,
            "attribute": attribute,
        }
        for person in people
        for attribute in ATTRIBUTES
    ]


def vocabulary() -> list[str]:
    """Every word the demo ever writes (names, values, template and question words), sorted; no special tokens."""
    words: set[str] = set(FIRST_NAMES) | set(LAST_NAMES)
    for values in VALUES.values():
        words.update(values)
    words.update(COUNTRIES.values())
    texts = [t for ts in TEMPLATES.values() for t in ts] + list(QUESTIONS.values()) + list(WORLD_TEMPLATES)
    for text in texts:
        text = re.sub(r"\{\w+\}", " ", text)
        words.update(re.findall(r"\w+|[^\w\s]+", text))
    return sorted(words)
