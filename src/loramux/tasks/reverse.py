"""Word-order reversal: ``apple river stone`` -> ``stone river apple``.

A small model asked for this usually reverses the letters, repeats the input, or explains. The
held-out split uses words and instruction phrasings that never occur in training.
"""
from __future__ import annotations

import random

from .core import Pools, Task, pick, pick_or_invent, split_every

WORDS = split_every((
    "apple", "river", "stone", "cloud", "table", "green", "house", "light", "music", "paper",
    "window", "garden", "silver", "orange", "forest", "bridge", "candle", "pencil", "rabbit", "castle",
    "winter", "summer", "yellow", "mirror", "planet", "rocket", "island", "valley", "desert", "ocean",
    "tiger", "horse", "eagle", "whale", "snake", "mouse", "lemon", "grape", "bread", "honey",
    "chair", "clock", "phone", "train", "plane", "truck", "ship", "road", "door", "wall",
    "blue", "red", "black", "white", "happy", "quiet", "quick", "slow", "small", "large",
    "north", "south", "east", "west", "king", "queen", "farmer", "doctor", "teacher", "pilot",
    "coffee", "water", "juice", "salt", "sugar", "pepper", "cheese", "butter", "rice", "soup",
    "shirt", "shoe", "hat", "coat", "glove", "ring", "watch", "bag", "box", "key",
    "star", "moon", "sun", "rain", "snow", "wind", "storm", "fire", "ice", "sand",
    "dog", "cat", "bird", "fish", "frog", "bear", "wolf", "fox", "lion", "duck",
    "book", "pen", "cup", "plate", "spoon", "knife", "fork", "bowl", "lamp", "bed",
    "city", "town", "farm", "park", "shop", "bank", "school", "church", "market", "harbor",
), 3)
INSTRUCTIONS = Pools(
    train=(
        "Reverse the order of these words: ",
        "Write these words in reverse order: ",
        "Reverse the word order: ",
        "Say these words backwards, last word first: ",
        "Reverse the sequence of words: ",
    ),
    heldout=(
        "Put these words in the opposite order: ",
        "Flip the order of the words: ",
    ),
)


def draw(rng: random.Random, split: str) -> tuple[str, str]:
    words = [pick_or_invent(rng, WORDS, split, p_invent=0.3, capitalize=False) for _ in range(rng.randint(3, 5))]
    return pick(rng, INSTRUCTIONS.of(split)) + " ".join(words), " ".join(reversed(words))


TASK = Task(
    name="reverse",
    description="reverse the order of the words (not the letters)",
    max_new_tokens=16,
    draw=draw,
    pools=(WORDS, INSTRUCTIONS),
    example="Reverse the order of these words: apple river stone cloud",
)
