"""Compositional captions over the embedded data's vocabulary, and paraphrases of them.

easy-VQA's own captions name only a colour and a shape (24 distinct sentences), too few to
tell whether a P-Former reconstructs sentences it has never seen. These sentences add size
and position, so held-out sentences are new combinations of known words; each also has
paraphrases (same content, other wording) to check that the P-Former's [CLS] space puts
meaning before wording.
"""
from __future__ import annotations

import itertools
import random

COLORS = ("red", "blue", "green", "yellow", "black", "gray", "teal", "brown", "orange", "purple")
SHAPES = ("circle", "rectangle", "triangle", "square", "star", "heart")
SIZES = ("small", "big", "tiny", "large")
PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the middle")

PARAPHRASES = (
    "{place} there is a {size} {color} {shape}",
    "a {color} {shape} that is {size}, {place}",
    "the picture shows a {size} {shape} in {color} {place}",
)


def compositional_captions(seed: int = 0) -> list[str]:
    """All 1,200 'a {size} {color} {shape} {place}' sentences, in a seeded order."""
    sentences = [f"a {size} {color} {shape} {place}"
                 for size, color, shape, place in itertools.product(SIZES, COLORS, SHAPES, PLACES)]
    random.Random(seed).shuffle(sentences)
    return sentences


def paraphrase(sentence: str, style: int) -> str:
    """Another wording of a compositional caption (style indexes PARAPHRASES)."""
    words = sentence.split()
    size, color, shape, place = words[1], words[2], words[3], " ".join(words[4:])
    return PARAPHRASES[style % len(PARAPHRASES)].format(size=size, color=color, shape=shape, place=place)
