"""What a task is: a seeded generator of (prompt, answer) pairs with a training and a held-out split.

A held-out split that shares names, values or sentence templates with the training split measures
memorisation, not learning. So every task draws its two splits from *disjoint* pools: other names,
other values and other templates (``Pools.train`` vs ``Pools.heldout``); ``tests/test_tasks.py``
checks the disjointness. Training values are also drawn half from invented words
(``pick_or_invent``), so adapters learn to copy from the prompt rather than to recall a list.
Answers are checked by exact match after whitespace normalisation.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

SPLITS = ("train", "heldout")
T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """One request and its only correct answer (compared after ``normalize``)."""

    task: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class Pools(Generic[T]):
    """The same kind of thing (names, templates...) split into disjoint train / held-out pools."""

    train: tuple[T, ...]
    heldout: tuple[T, ...]

    def __post_init__(self) -> None:
        if not self.train or not self.heldout:
            raise ValueError(f"both pools need items: train has {len(self.train)}, heldout {len(self.heldout)}")
        shared = set(self.train) & set(self.heldout)
        if shared:
            raise ValueError(f"train and heldout pools share {sorted(map(str, shared))[:5]}: remove them from one side")

    def of(self, split: str) -> tuple[T, ...]:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        return self.train if split == "train" else self.heldout


@dataclass(frozen=True)
class Task:
    """A named task: ``draw(rng, split)`` returns one ``(prompt, answer)`` of that split.

    ``max_new_tokens`` bounds generation: the longest answer plus the end-of-turn token, with room.
    ``pools`` lists the task's pool pairs so tests can check they are disjoint.
    """

    name: str
    description: str
    max_new_tokens: int
    draw: Callable[[random.Random, str], tuple[str, str]]
    pools: tuple[Pools, ...]
    example: str  # one sentence for docs and `loramux demo`

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"task name {self.name!r} must be an identifier (it names the adapter directory)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must be >= 1")

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """``n`` distinct examples of ``split``, the same for the same ``seed`` on every machine.

        ``random.Random`` seeded with a string hashes it with SHA-512: stable across processes and
        Python versions, unlike ``hash()``.
        """
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        rng = random.Random(f"loramux:{self.name}:{split}:{seed}")
        seen: dict[str, str] = {}
        for _ in range(n * 50):
            if len(seen) == n:
                break
            prompt, answer = self.draw(rng, split)
            seen.setdefault(prompt, answer)
        if len(seen) < n:
            raise ValueError(f"task {self.name!r} could only make {len(seen)} distinct {split} prompts, not {n}")
        return [Example(self.name, prompt, answer) for prompt, answer in seen.items()]


def normalize(text: str) -> str:
    """Whitespace-normalised answer: runs of whitespace become one space, ends stripped."""
    return " ".join(text.split())


def is_correct(output: str, answer: str) -> bool:
    return normalize(output) == normalize(answer)


def pick(rng: random.Random, items: Sequence[T]) -> T:
    return items[rng.randrange(len(items))]


def split_every(items: Sequence[T], k: int) -> Pools[T]:
    """Every ``k``-th item (starting with the second) to held-out, the rest to train."""
    heldout = tuple(x for i, x in enumerate(items) if i % k == 1)
    return Pools(tuple(x for i, x in enumerate(items) if i % k != 1), heldout)


_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "st", "tr", "ch", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
_CODAS = ("", "", "n", "r", "s", "l", "m", "k")


def invent_word(rng: random.Random, avoid: Sequence[str] = (), capitalize: bool = True) -> str:
    """A pronounceable made-up word (2-3 syllables) not in ``avoid``.

    Training values drawn partly from invented words make an adapter *copy* names and places from
    the prompt: trained only on a few dozen real cities, a LoRA learns the list and answers
    "Zurich" with a near miss from it ("Zuraco").
    """
    avoid_lower = {a.lower() for a in avoid}
    while True:
        word = "".join(pick(rng, _ONSETS) + pick(rng, _VOWELS) + pick(rng, _CODAS) for _ in range(rng.randint(2, 3)))
        if word not in avoid_lower:
            return word.capitalize() if capitalize else word


def pick_or_invent(rng: random.Random, pools: Pools[str], split: str, p_invent: float = 0.5,
                   capitalize: bool = True) -> str:
    """Training split: an invented word with probability ``p_invent``, else a training-pool item.
    Held-out split: always a held-out pool item."""
    if split == "train" and rng.random() < p_invent:
        return invent_word(rng, avoid=pools.heldout, capitalize=capitalize)
    return pick(rng, pools.of(split))


# Real place names for training values only (never held out): most are one token after a space
# (" Zurich") but several after a quote ('"Z','ur','ich'), so answers must spell what the prompt
# holds as one token; many such words in training teach that, a few dozen do not.
EXTRA_TRAIN_PLACES = (
    "Aberdeen", "Adelaide", "Algiers", "Amman", "Ankara", "Baghdad", "Baku", "Bangkok", "Barcelona", "Basel",
    "Beirut", "Belfast", "Belgrade", "Birmingham", "Bologna", "Bordeaux", "Bremen", "Brisbane", "Bristol",
    "Bucharest", "Calgary", "Cambridge", "Canberra", "Cardiff", "Casablanca", "Chennai", "Cologne", "Dallas",
    "Damascus", "Detroit", "Dhaka", "Dortmund", "Dresden", "Dubai", "Durban", "Edinburgh", "Florence", "Frankfurt",
    "Genoa", "Granada", "Hanover", "Harare", "Houston", "Istanbul", "Jakarta", "Kabul", "Karachi", "Kiev",
    "Kolkata", "Lagos", "Leeds", "Leipzig", "Liverpool", "Ljubljana", "Luxembourg", "Malaga", "Manchester",
    "Melbourne", "Miami", "Minsk", "Moscow", "Nagoya", "Nantes", "Nice", "Oxford", "Palermo", "Phoenix",
    "Pittsburgh", "Portland", "Rotterdam", "Salzburg", "Sapporo", "Seattle", "Shanghai", "Stuttgart",
    "Tampa", "Tehran", "Toledo", "Toulouse", "Turin", "Utrecht", "Vancouver", "Venice", "Verona", "Vilnius",
    "Winnipeg", "Zagreb", "Beijing", "Taipei", "Jaipur", "Lahore", "Nairobi", "Kampala", "Luanda", "Maputo",
)
