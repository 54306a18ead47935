"""JSON extraction: a sentence about a person -> ``{"name": ..., "age": ..., "city": ...}``.

The key names, their order, the integer age and the single-line layout are the convention the
adapter has to learn; the base model answers in prose or in a multi-line block with commentary.
"""
from __future__ import annotations

import json
import random

from .core import EXTRA_TRAIN_PLACES, Pools, Task, pick, pick_or_invent, split_every

NAMES = split_every((
    "Maria", "Ahmed", "Chen", "Olga", "Lucas", "Amara", "Kenji", "Sofia", "Diego", "Ingrid",
    "Tomas", "Priya", "Omar", "Hana", "Pierre", "Zara", "Mateo", "Yuki", "Fatima", "Liam",
    "Elena", "Kwame", "Nadia", "Jonas", "Aisha", "Carlos", "Mei", "Viktor", "Leila", "Noah",
    "Isabel", "Ravi", "Greta", "Tariq", "Chloe", "Emil", "Sakura", "Bruno", "Anya", "Felix",
    "Lucia", "Hugo", "Nia", "Oscar", "Mira", "Arjun", "Clara", "Dmitri", "Rosa", "Samuel",
    "Keiko", "Andre", "Lena", "Youssef", "Ada", "Marco", "Ines", "Boris", "Daria", "Pablo",
    "Eva", "Hassan", "Julia", "Nikolai", "Lina", "Rafael", "Freya", "Malik", "Vera", "Teo",
    "Alma", "Stefan", "Maya", "Gustav", "Selin", "Joao", "Irene", "Kofi", "Nora", "Anton",
), 3)
CITIES = split_every((
    "Lisbon", "Berlin", "Tokyo", "Nairobi", "Toronto", "Madrid", "Oslo", "Cairo", "Lima", "Seoul",
    "Dublin", "Prague", "Mumbai", "Sydney", "Vienna", "Bogota", "Helsinki", "Accra", "Hanoi", "Quito",
    "Warsaw", "Athens", "Denver", "Manila", "Porto", "Zurich", "Dakar", "Osaka", "Chicago", "Krakow",
    "Lyon", "Boston", "Santiago", "Kyoto", "Munich", "Tunis", "Glasgow", "Perth", "Riga", "Seville",
    "Montreal", "Geneva", "Rome", "Havana", "Marseille", "Tallinn", "Bergen", "Austin", "Naples", "Delhi",
    "New York", "Buenos Aires", "Cape Town", "San Diego", "Hong Kong", "Rio de Janeiro", "Kuala Lumpur",
    "Tel Aviv", "Mexico City", "Las Vegas",
), 3)
CITIES = Pools(CITIES.train + tuple(c for c in EXTRA_TRAIN_PLACES if c not in CITIES.train + CITIES.heldout),
               CITIES.heldout)
AGES = split_every(tuple(range(18, 91)), 3)
TEMPLATES = Pools(
    train=(
        "{name} is {age} and lives in {city}.",
        "{name}, {age}, lives in {city}.",
        "Meet {name} from {city}, who is {age} years old.",
        "{name} ({age}) is based in {city}.",
        "At {age}, {name} calls {city} home.",
        "{city} resident {name} is {age} years old.",
        "Name: {name}. Age: {age}. Home town: {city}.",
        "{name} lives in {city} and is {age}.",
        "Age {age}, city {city}, name {name}.",
        "Our new colleague {name} is {age} and moved to {city}.",
        "{name}, aged {age}, from {city}.",
        "{name} turned {age} this year in {city}.",
        "Born and raised in {city}, {name} is now {age}.",
        "{name} works in {city}. Age: {age}.",
    ),
    heldout=(
        "{name} is a {age}-year-old living in {city}.",
        "Living in {city}, {name} is {age} years of age.",
        "{name} has made {city} home and is {age} now.",
        "This is {name}; {age} years old; lives in {city}.",
    ),
)
INSTRUCTION = "Extract the person as JSON: "


def draw(rng: random.Random, split: str) -> tuple[str, str]:
    name, age, city = pick_or_invent(rng, NAMES, split), pick(rng, AGES.of(split)), pick_or_invent(rng, CITIES, split)
    sentence = pick(rng, TEMPLATES.of(split)).format(name=name, age=age, city=city)
    return INSTRUCTION + sentence, json.dumps({"name": name, "age": age, "city": city})


TASK = Task(
    name="json",
    description="extract name, age and city from a sentence as one-line JSON",
    max_new_tokens=32,
    draw=draw,
    pools=(NAMES, CITIES, AGES, TEMPLATES),
    example=INSTRUCTION + "Maria is 34 and lives in Lisbon.",
)
