"""extract-features' plan: the images (or videos) of its input, each id once, as compact columns.

A list of ImageRecords (captions and meta included), a set of ids and a list of Item objects
cost every torchrun rank tens of GB at BLIP-2's 129M images, and forked DataLoader workers copy
the pages that their reference counts touch (pytorch#13246). Here the plan is the pair reader's
id and reference columns (pairs.py; written once per machine and memory-mapped where the input
is a list of files, pair_store.py) and one integer array naming which of their images are the
items: a handful of objects, whatever the number of images. The items keep the order the plan
always had (files in order, each file's images in first-seen order, an id met again in a later
file kept at its first place, then `limit`), so plan_sha256 and existing caches are unchanged.
"""
from __future__ import annotations

import glob
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blitext.config import default_cache_root
from blitext.data import pair_store
from blitext.data.columns import GatherColumn, ImageRefs
from blitext.data.pairs import Pairs, _PairColumns
from blitext.data.text import first_copies
from blitext.errors import BlitextError


@dataclass(frozen=True)
class Item:
    key: str
    root: Path
    ref: str


class PlanItems(Sequence):
    """Item i is image number index[i] of the columns: its id (the cache key), root and reference,
    built when asked for. `keys` is the CachePlan's sequence of keys."""

    def __init__(self, refs: ImageRefs, index: np.ndarray):
        self.refs, self.index = refs, index
        self.keys = GatherColumn(refs.ids, index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = int(self.index[i])
        root = self.refs.roots[bisect_right(self.refs.file_starts, n) - 1]
        return Item(self.refs.ids._get(n), Path(root), self.refs.refs._get(n))

    def mean_key_bytes(self) -> float:
        """The keys' mean UTF-8 length, from the offsets (--dry-run's estimate): no string decoded."""
        lengths = np.diff(np.asarray(self.refs.ids.offsets))[self.index]
        return float(lengths.mean()) if len(lengths) else 0.0

    def nbytes(self) -> int:
        """What the columns hold (mapped from the store, or in memory): ids, references, the index."""
        return self.refs.ids.nbytes + self.refs.refs.nbytes + self.index.nbytes


def plan_sources(data: str, image_root: str | None) -> list[str]:
    """Input path (or a glob of .tar shards), or a prepared dataset (its name, or its folder of captions*.json)."""
    path = Path(data)
    if not path.exists() and "*" not in data:
        path = default_cache_root() / "data" / data
        if not path.is_dir():
            raise BlitextError(f"--data {data!r} is neither a file or folder nor a prepared dataset in "
                               f"{path.parent}: run `blitext data prepare {data}` or pass a path")
    prepared = sorted(path.glob("captions*.json")) if path.is_dir() else []
    if prepared:
        return [str(p) for p in prepared]
    return [data if "*" in data else str(path)]


def plan_items(config, what: str = "images") -> PlanItems:
    """The items of `config.data` (an ExtractConfig or VideoExtractConfig), each id once, first `limit`."""
    refs = plan_columns(plan_sources(config.data, config.image_root), config.image_root)
    index = _first_places(refs)
    if not len(index):
        raise BlitextError(f"--data {config.data!r} lists no {what}: add {what} to it or pass another --data")
    index = index[:config.limit] if config.limit else index
    return PlanItems(refs, index.astype(np.int32 if len(refs.ids) < 2**31 else np.int64))


def _first_places(refs: ImageRefs) -> np.ndarray:
    """The image numbers to extract: an id met again in a later split or file is stored once, at its
    first place. Each source's ids are distinct already (numbered per source), so one source needs
    no hashing (the 129M-image case: 40 B per image of hashes and sort for nothing)."""
    if len(refs.file_starts) == 1:
        return np.arange(len(refs.ids))
    return first_copies(refs.ids)


def plan_columns(sources: list[str], image_root: str | None) -> ImageRefs:
    """The ids and references of every image the sources list, numbered per source in first-seen order."""
    # read_pairs' own sink and store, not read_pairs: it takes caption files only (no image folder or
    # .tar glob) and refuses inputs without captions, which extraction accepts (a folder of images)
    parse = lambda: _parse(sources, image_root)  # noqa: E731
    files = [_files_read(s) for s in sources]
    if any(f is None for f in files):
        return parse().image_refs  # a folder of image files: listing it is the parse, nothing to fingerprint
    # the sources are keyed in too: a glob's pattern decides the root its references start from
    made_from = pair_store.inputs([p for f in files for p in f], image_root, f"no captions: images of {sources}")
    return pair_store.stored_pairs(made_from, parse, _count_images).image_refs


def _parse(sources: list[str], image_root: str | None) -> Pairs:
    columns = _PairColumns(has_image=lambda image_id: False)  # no caption kept: the plan needs ids and references
    for source in sources:
        columns.read(source, image_root)
    return columns.pairs()


def _count_images(pairs: Pairs) -> str:
    return f"{len(pairs.image_refs.ids):,} image ids and references (extract-features' plan, no captions)"


def _files_read(source: str) -> list[Path] | None:
    """The files a source is read from (readers.py's choice), for the store's fingerprint; None for
    a folder of image or video files, whose files' sizes and times a fingerprint would have to list."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        for name in ("captions.jsonl", "captions.csv"):
            if (path / name).is_file():
                return [path / name]
        return sorted(path.glob("*.tar")) or None
    return sorted(Path(p) for p in glob.glob(source, recursive=True)) or None  # none: the reader says so
