"""The corpus's whole-column questions (text.py) answer as a set of str would, in numpy: distinct
sentences, the first repeat, sorted(set(...))[r], and train-pformer's held-out split built on them."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import blitext.data.text as text
from blitext.data.text import TextCorpus, first_copies, first_copy_of, first_repeat, sorted_distinct_at
from blitext.pformer.train import split_corpus

# shared prefixes past 8 bytes, multi-byte UTF-8, a NUL and one-byte strings: every place the
# 8-byte prefix order could disagree with str's
WORDS = ["a", "a man", "a man is", "é", "ß", "z", "a\x00", "🙂", "man", "is", "riding", "Zebra"]


def corpus(n: int, seed: int) -> TextCorpus:
    rng = random.Random(seed)
    c = TextCorpus()
    for i in range(n):
        c.add(f"f.txt:{i + 1}", " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))))
    return c


def by_set(c: TextCorpus, heldout: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """train-pformer's split as it was written before: sorted(set(sentences)), then a seeded permutation."""
    ids, sentences = list(c.ids), list(c.sentences)
    distinct = sorted(set(sentences))
    order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed)).tolist()
    held = [distinct[i] for i in order[:heldout]]
    train = [(k, s) for k, s in zip(ids, sentences) if s not in held]
    return [k for k, _ in train], [s for _, s in train], held


@pytest.fixture(params=["hashes", "every hash equal"])
def hashes(request, monkeypatch):
    """The real hashes, and hashes that all collide: the bytes must still tell the strings apart."""
    if request.param != "hashes":
        monkeypatch.setattr(text, "string_hashes", lambda column: np.zeros(len(column), np.int64))


@pytest.mark.parametrize("seed", range(6))
def test_split_equals_the_set_based_split(hashes, seed):
    c = corpus(300, seed)
    split = split_corpus(c, 8, seed)
    train_ids, train, held = by_set(c, 8, seed)
    assert split.heldout == held
    assert list(split.train) == train and list(split.train_ids) == train_ids
    assert not set(held) & set(split.train)  # every copy of a held-out sentence left training


@pytest.mark.parametrize("seed", range(6))
def test_distinct_repeat_and_ranks_equal_a_sets(hashes, seed):
    sentences = corpus(200, seed).sentences
    as_list = list(sentences)
    first = first_copies(sentences)
    assert [as_list[i] for i in first] == list(dict.fromkeys(as_list))
    ordered = sorted(set(as_list))
    ranks = random.Random(seed).sample(range(len(ordered)), 10)
    assert sorted_distinct_at(sentences, first, ranks) == [ordered[r] for r in ranks]
    seen: set[str] = set()
    assert first_repeat(sentences) == next(s for s in as_list if s in seen or seen.add(s))


@pytest.mark.parametrize("seed", range(3))
def test_first_copy_numbers_group_as_a_dict_does(hashes, seed):
    """train-adapter's same-image / same-caption groups: one number per distinct string."""
    sentences = corpus(300, seed).sentences
    numbers = first_copy_of(sentences)
    by_dict: dict[str, int] = {}
    dense = [by_dict.setdefault(s, len(by_dict)) for s in sentences]
    pairs = [(i, j) for i in range(0, 300, 7) for j in range(300)]
    assert [numbers[i] == numbers[j] for i, j in pairs] == [dense[i] == dense[j] for i, j in pairs]


def test_no_repeat_in_distinct_ids():
    assert first_repeat(corpus(50, 0).ids) is None


def test_the_corpus_holds_columns_not_python_strings():
    c = corpus(10_000, 0)
    held = c.ids.nbytes + c.sentences.nbytes
    text_bytes = sum(len(s.encode()) for s in c.sentences) + sum(len(k.encode()) for k in c.ids)
    assert held == text_bytes + 2 * 8 * (len(c) + 1)  # the UTF-8 and two int64 offsets a sentence, nothing per object
