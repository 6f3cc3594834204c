"""train-pformer's sentences and held-out split written once per machine under the cache root and memory-mapped.

Every torchrun rank used to read the text files into a TextCorpus (~85 bytes per sentence) and
split it (8 bytes per sentence more): 1.1 GB and minutes of parsing per rank at the paper's 12M
sentences. Here one process reads and splits them and writes `<cache root>/sentences/<fingerprint>/`,
and every rank maps the files (column_store.py builds, publishes and shares the folder, as it
does read_pairs' captions): a rank's own memory for the sentences no longer grows with them.

The folder holds the ids and the sentences as string columns (a UTF-8 `.bin` blob and `.npy`
offsets), the training rows (`train.npy`: int64 indexes into them, in corpus order), and
`sentences.json`, written last, with the held-out sentences, read_sentences' counts and every
file's size. The fingerprint is of what decides the split: each text file's path, size and
mtime_ns, bad_bytes, heldout and seed: a changed input is a new folder.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from blitext.atomic import read_json
from blitext.data import column_store
from blitext.data.column_store import Store, file_facts, load, open_strings, save_strings
from blitext.data.columns import GatherColumn

FORMAT = "blitext-sentences/1"
MARKER = "sentences.json"  # written last: its presence says the folder is complete
FILES = ("ids.bin", "sentences.bin", "ids.npy", "sentences.npy", "train.npy")


@dataclass
class Split:
    """train-pformer's sentences: the training ones and their ids (the corpus's columns seen
    through one index of training rows), and the held-out ones."""
    train_ids: Sequence[str]
    train: Sequence[str]
    heldout: list[str]
    counts: Counter = field(default_factory=Counter)  # read_sentences' counts (empty lines skipped, ...)
    store: Path | None = None                          # the folder the columns are mapped from, if any


def inputs(paths: list[Path], bad_bytes: str, heldout: int, seed: int) -> dict:
    """What decides the split: its folder's name hashes it, and sentences.json records it."""
    return {"format": FORMAT, "files": file_facts(paths), "bad_bytes": bad_bytes, "heldout": heldout, "seed": seed}


def _fill(folder: Path, split: Split) -> dict:
    ids, sentences = split.train_ids.values, split.train.values
    save_strings(folder, "ids", ids)
    save_strings(folder, "sentences", sentences)
    np.save(folder / "train.npy", np.asarray(split.train.index, np.int64))
    return {"sentences": len(sentences), "train": len(split.train), "heldout": list(split.heldout),
            "counts": dict(split.counts)}


def open_split(folder: Path) -> Split:
    """The split in a complete `folder` (column_store.problem is None), memory-mapped: nothing is read."""
    meta = read_json(folder / MARKER)
    ids, sentences = (open_strings(STORE, folder, name, meta["sentences"]) for name in ("ids", "sentences"))
    train = load(STORE, folder / "train.npy")
    if len(train) != meta["train"]:
        raise column_store.damaged(STORE, folder, f"train.npy does not hold {meta['train']:,} training rows")
    return Split(GatherColumn(ids, train), GatherColumn(sentences, train), meta["heldout"], Counter(meta["counts"]),
                 folder)


STORE = Store("sentences", FORMAT, MARKER, FILES, _fill, open_split, columns="sentence columns",
              sources="text files", same="text files, --bad-bytes, --heldout and --seed")


def _sentence_count(split: Split) -> str:
    return f"{len(split.train.values):,} sentences ({len(split.heldout):,} held out)"


def stored_split(made_from: dict, parse: Callable[[], Split]) -> Split:
    """The split of these inputs (`inputs()`) mapped from its folder, which the first process to
    need it reads, splits and writes (column_store.stored: rank 0 of a torchrun builds, the others
    wait; an unwritable cache root keeps it in memory)."""
    return column_store.stored(STORE, made_from, parse, _sentence_count)
