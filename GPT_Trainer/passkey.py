"""The pass-key retrieval text of the needle-in-a-haystack task (docs/math.md#niah), generated offline.

The built-in training corpus mixes these documents with filler prose, and niah.py uses the same format
when the hub dataset is out of reach, so a model trained offline is tested on what it has seen.
"""
from __future__ import annotations

import random

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is "


def needle(pass_key: int) -> str:
    return f"The pass key is {pass_key}. Remember it. {pass_key} is the pass key."


def passkey_prompt(pass_key: int, context_length: int, depth: float = 0.5) -> str:
    """A prompt of about `context_length` characters with the needle at relative position `depth`.

    Like the hub dataset's `context_length`, the length counts characters, not tokens.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    fixed = len(INTRO) + len(needle(pass_key)) + len(QUESTION) + 3
    repeats = max(0, (context_length - fixed) // (len(FILLER) + 1))
    cut = round(repeats * depth)
    parts = [INTRO, *([FILLER] * cut), needle(pass_key), *([FILLER] * (repeats - cut)), QUESTION]
    return " ".join(parts)


def passkey_example(rng: random.Random, context_length: int) -> tuple[str, int]:
    """(prompt, answer) with a random 4- or 5-digit pass key at a random depth."""
    pass_key = rng.randint(1000, 99999)
    return passkey_prompt(pass_key, context_length, rng.random()), pass_key
