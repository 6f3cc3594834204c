"""read_pairs' columns written once to files under the cache root and memory-mapped read-only.

Every torchrun rank used to parse the caption files into its own columns (~135 bytes and ~9 us
of CPU per caption: 18 GB and 20 minutes per rank at BLIP-2's 129M captions). Here one process
parses and writes `<cache root>/pairs/<fingerprint>/`, and every rank (and its forked workers)
maps the files: the page cache holds them once per machine, and a rank's own memory for the
pairs no longer grows with captions. How a folder is built, published, checked and shared
between ranks is column_store.py's, as for train-pformer's sentences (sentence_store.py).

The folder holds each column as keyindex.py holds keys (a UTF-8 `.bin` blob and `.npy`
offsets), the per-caption image numbers and k, train-adapter's group numbers (Pairs.groups():
which pairs of a batch match, same image id or same text; computed here once, where every rank
used to sort the whole columns for them), and `pairs.json`, written last, whose presence says
the rest is complete (it records every file's size). The fingerprint is of what decides the
columns: each caption file's path, size and mtime_ns, the image root, and which ids have
features (`accepts`): a changed input is a new folder. The format is in it too, so folders of
format 1 (without the group numbers) are left beside the new ones until deleted; one found
under a current name would be rebuilt (its marker's format differs).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from blitext.atomic import read_json
from blitext.data import column_store
from blitext.data.column_store import Store, file_facts, load, open_strings, save_strings
from blitext.data.columns import GatherColumn, ImageRefs, KeyColumn
from blitext.data.pairs import Pairs

FORMAT = "blitext-pairs/2"  # 2: the group numbers added
MARKER = "pairs.json"  # written last: its presence says the folder is complete
STRINGS = ("texts", "ids", "refs")  # each a <name>.bin blob and <name>.npy offsets
ARRAYS = ("image_index", "k")
GROUPS = ("image_group", "text_group")  # Pairs.groups(), int32 per caption
FILES = tuple(f"{s}.bin" for s in STRINGS) + tuple(f"{a}.npy" for a in (*STRINGS, *ARRAYS, *GROUPS))
WAIT = column_store.WAIT


def inputs(paths: list[Path], image_root: str | None, accepts: str) -> dict:
    """What decides the columns: their folder's name hashes it, and pairs.json records it."""
    # `accepts` (which ids have features) is keyed in and only kept captions stored, rather than all
    # captions and a mask made each run: a mask would cost every rank bytes and a lookup per caption
    return {"format": FORMAT, "files": file_facts(paths), "accepts": accepts,
            "image_root": str(Path(image_root).resolve()) if image_root else None}


def pairs_folder(made_from: dict) -> Path:
    """`<cache root>/pairs/<fingerprint of the inputs>`."""
    return STORE.folder(made_from)


# ---------------------------------------------------------------- writing

def write_pairs(folder: Path, pairs: Pairs, made_from: dict) -> None:
    """The columns of `pairs` (read_pairs' in-memory ones) into `folder`, complete or not at all."""
    column_store.write(STORE, folder, pairs, made_from)


def _fill(folder: Path, pairs: Pairs) -> dict:
    ids, refs = pairs.image_refs.ids, pairs.image_refs.refs
    for name, column in zip(STRINGS, (pairs.texts, ids, refs)):
        save_strings(folder, name, column)
    np.save(folder / "image_index.npy", np.asarray(pairs.image_ids.index))
    np.save(folder / "k.npy", np.asarray(pairs.keys.k))
    for name, numbers in zip(GROUPS, pairs.groups()):
        np.save(folder / f"{name}.npy", numbers)
    return _counts(pairs)


def _counts(pairs: Pairs) -> dict:
    refs = pairs.image_refs
    return {"captions": len(pairs), "images": len(refs.ids), "skipped": pairs.skipped,
            "blank": pairs.blank, "no_caption": pairs.no_caption,
            # absolute: a later run from another working directory finds the same images
            "roots": [os.path.abspath(r) for r in refs.roots], "file_starts": list(refs.file_starts)}


# ---------------------------------------------------------------- reading

def problem(folder: Path) -> str | None:
    """Why `folder` is not a complete set of columns (then it is rebuilt), or None."""
    return column_store.problem(STORE, folder)


def open_pairs(folder: Path) -> Pairs:
    """The columns in a complete `folder` (problem() is None), memory-mapped: nothing is read."""
    meta = read_json(folder / MARKER)
    texts = open_strings(STORE, folder, "texts", meta["captions"])
    ids, refs = (open_strings(STORE, folder, name, meta["images"]) for name in ("ids", "refs"))
    image_index, k, *groups = (_per_caption(folder, name, meta["captions"]) for name in (*ARRAYS, *GROUPS))
    image_ids = GatherColumn(ids, image_index)
    image_refs = ImageRefs(ids, refs, image_index, [Path(r) for r in meta["roots"]], meta["file_starts"])
    return Pairs(KeyColumn(image_ids, k), image_ids, texts, image_refs, meta["skipped"], meta["blank"],
                 meta["no_caption"], folder, tuple(groups))


def _per_caption(folder: Path, name: str, captions: int) -> np.ndarray:
    """The mapped array `<name>.npy`, one entry per caption."""
    array = load(STORE, folder / f"{name}.npy")
    if len(array) != captions:
        raise column_store.damaged(STORE, folder, f"{name}.npy does not hold {captions:,} captions")
    return array


STORE = Store("pairs", FORMAT, MARKER, FILES, _fill, open_pairs, columns="caption columns", sources="caption files",
              same="caption files and features")


# ---------------------------------------------------------------- one parse per machine

def _pair_count(pairs: Pairs) -> str:
    return f"{len(pairs):,} pairs"


def stored_pairs(made_from: dict, parse: Callable[[], Pairs], counted: Callable[[Pairs], str] = _pair_count) -> Pairs:
    """The columns of these inputs (`inputs()`) mapped from their folder, which the first process
    to need them parses and writes (column_store.stored: rank 0 of a torchrun builds, the others
    wait; an unwritable cache root keeps them in memory). `counted(pairs)` says what the columns
    hold in the messages."""
    return column_store.stored(STORE, made_from, parse, counted)
