"""Date normalisation: ``March 5, 2021`` / ``the 5th of March, 2021`` ... -> ``2021-03-05``.

The adapter has to learn month-name -> number, zero padding and the field order, and to answer with
the date alone. The held-out split uses years and written date formats never seen in training.
"""
from __future__ import annotations

import calendar
import random

from .core import Pools, Task, pick, split_every

MONTHS = tuple(calendar.month_name[1:])  # ("January", ...): English whatever the locale
YEARS = split_every(tuple(range(1950, 2051)), 3)
FORMATS = Pools(
    train=(
        "{month} {day}, {year}",
        "{day} {month} {year}",
        "{mon} {day} {year}",
        "the {ordinal} of {month}, {year}",
        "{month} {ordinal}, {year}",
        "{year}, {month} {day}",
        "{day} {mon} {year}",
    ),
    heldout=(
        "{ordinal} {month} {year}",
        "{mon}. {day}, {year}",
        "{month} the {ordinal}, {year}",
    ),
)
INSTRUCTIONS = Pools(
    train=("Convert to an ISO date: ", "Write this date as YYYY-MM-DD: ", "Normalize the date: "),
    heldout=("Give this date in ISO format: ",),
)


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def draw(rng: random.Random, split: str) -> tuple[str, str]:
    year, month = pick(rng, YEARS.of(split)), rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    name = MONTHS[month - 1]
    text = pick(rng, FORMATS.of(split)).format(month=name, mon=name[:3], day=day, ordinal=ordinal(day), year=year)
    return pick(rng, INSTRUCTIONS.of(split)) + text, f"{year:04d}-{month:02d}-{day:02d}"


TASK = Task(
    name="date",
    description="rewrite a date written in words as YYYY-MM-DD",
    max_new_tokens=16,
    draw=draw,
    pools=(YEARS, FORMATS, INSTRUCTIONS),
    example="Convert to an ISO date: the 5th of March, 2021",
)
