"""Training pairs for the adaptor: captions joined to visual features by image id.

A caption file's records give (image id, captions); a pair is one caption, keyed
`<image_id>#k` as the prompt cache keys it. Its visual input comes from a feature source:
`CachedFeatures` (rows of an extract-features cache) or `OnlineFeatures` (the frozen encoder
run on the decoded image inside the loop, as the reference code does).

train-adapter counts pairs of a batch as matches when they share an image or a caption text:
`Pairs.groups()` numbers both per caption (equal values, equal numbers; 8 B a caption). Stored
pairs carry them mapped from their folder, computed once by the process that wrote it
(pair_store.py), so no rank holds or sorts them; in-memory pairs compute them on first use.
"""
from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from blitext.cache import FeatureCache
from blitext.cache.keyindex import FILES as INDEX_FILES, INDEX_DIR
from blitext.config import default_cache_root
from blitext.console import say
from blitext.data.columns import GatherColumn, ImageRefs, KeyColumn, StringBuilder
from blitext.data.images import load_image
from blitext.data.parsing import _CaptionSink, _not_in_images
from blitext.data.readers import read_captions_into, read_image_set
from blitext.data.text import expand_paths, first_copy_of
from blitext.errors import BadInputError, BlitextError


@dataclass
class Pairs:
    """Image-caption pairs, joined by key: caption key `<image_id>#k` -> image id -> features.
    read_pairs gives compact columns (columns.py); any sequences of str will do (a bench's lists)."""
    keys: Sequence[str]
    image_ids: Sequence[str]
    texts: Sequence[str]
    image_refs: Mapping[str, tuple[Path, str]]  # image id -> (root, reference), for --online
    skipped: int = 0                            # captions whose image has no features (failed extraction)
    blank: int = 0                              # blank captions the readers skipped (reported once)
    no_caption: int = 0                         # caption rows without a caption (in the run's end line)
    store: Path | None = None                   # the folder the columns are mapped from (pair_store.py), if any
    group_numbers: tuple[np.ndarray, np.ndarray] | None = None  # groups(): mapped from `store`, else made on first use

    def __len__(self) -> int:
        return len(self.keys)

    def groups(self) -> tuple[np.ndarray, np.ndarray]:
        """(image group, text group): per caption, int32 numbers equal exactly where the image ids
        (texts) are. Index them per batch: from a store they are mapped, read only where indexed."""
        if self.group_numbers is None:
            self.group_numbers = group_numbers(self.image_ids), group_numbers(self.texts)
        return self.group_numbers

    def nbytes(self) -> int:
        """The bytes the columns hold (the image ids counted once: keys share them)."""
        return self.texts.nbytes + self.image_ids.nbytes + self.keys.k.nbytes + self.image_refs.nbytes


def group_numbers(values: Sequence[str]) -> np.ndarray:
    """Equal values, equal numbers (each value's first copy), as int32: 4 B a caption, and no dict
    of every caption's text while numbering them (129M str objects). Image groups come from the
    ids, as train-adapter always numbered them, not from image_index, which numbers per caption
    file (one id in two files would be two groups)."""
    return first_copy_of(values).astype(np.int32)


class _NamesTwoImages(Exception):
    """An id met with a second image: the columns keep no row locations, so the file is read again
    by read_image_set, whose error names both rows (and every other bad row) as it always did."""


class _PairColumns(_CaptionSink):
    """read_pairs' caption sink: each kept caption of an image with features goes straight into
    compact columns, numbered k within its image. Image ids are numbered per file (each file's
    images were always grouped on their own); the id -> number dict lives only while reading."""

    def __init__(self, has_image):
        super().__init__()
        self.has_image = has_image
        self.ids, self.refs, self.texts = StringBuilder(), StringBuilder(), StringBuilder()
        self.featured = bytearray()        # per image: has_image(id), asked once
        self.caption_counts = array("i")   # per image: its captions so far, the next one's k
        self.image_index, self.k = array("i"), array("i")
        self.skipped = 0
        self.roots: list[Path] = []
        self.file_starts: list[int] = []
        self._numbers: dict[str, int] = {}

    def read(self, path: str, image_root: str | None) -> None:
        self._numbers = {}
        self.file_starts.append(len(self.featured))
        try:
            root, _source = read_captions_into(path, image_root, self)
        except _NamesTwoImages:
            read_image_set(path, image_root)  # raises the error naming both rows
            raise BlitextError(f"{path}: an image id names two different images; give each image its own id") from None
        self.roots.append(root)

    def add(self, image_id: str, image: str, captions: list[str] | None, meta: dict, where: str) -> None:
        number = self._numbers.get(image_id)
        if number is None:
            number = self._new_image(image_id, image)
        elif self.refs[number] != image:
            raise _NamesTwoImages
        self._add_kept(number, self._kept(captions))

    def add_captions(self, image_id: str, captions: list[str] | None, where: str) -> None:
        number = self._numbers.get(image_id)
        if number is None:
            raise _not_in_images(image_id, where)
        self._add_kept(number, self._kept(captions))

    def _new_image(self, image_id: str, image: str) -> int:
        number = self._numbers[image_id] = len(self.featured)
        self.ids.append(image_id)
        self.refs.append(image)
        self.featured.append(bool(self.has_image(image_id)))
        self.caption_counts.append(0)
        return number

    def _add_kept(self, number: int, kept: list[str]) -> None:
        if not kept:
            return
        if not self.featured[number]:
            self.skipped += len(kept)
            return
        k = self.caption_counts[number]
        for text in kept:
            self.texts.append(text)
            self.image_index.append(number)
            self.k.append(k)
            k += 1
        self.caption_counts[number] = k

    def pairs(self) -> Pairs:
        """The columns, captions grouped by image in first-seen order as ImageRecords had them
        (COCO's annotations interleave images: a stable sort by image number restores it)."""
        self._numbers = {}
        image_index, k = np.frombuffer(self.image_index, np.intc), np.frombuffer(self.k, np.intc)
        texts = self.texts.column()
        if np.any(image_index[1:] < image_index[:-1]):
            order = np.argsort(image_index, kind="stable")
            image_index, k, texts = image_index[order], k[order], texts.reordered(order)
        k = k.astype(np.min_scalar_type(int(k.max()) if len(k) else 0))
        ids = self.ids.column()
        image_ids = GatherColumn(ids, image_index)
        refs = ImageRefs(ids, self.refs.column(), image_index, self.roots, self.file_starts)
        return Pairs(KeyColumn(image_ids, k), image_ids, texts, refs, self.skipped, self.blank, self.no_caption)


def default_captions(features: FeatureCache | None) -> list[str]:
    """The train captions of the prepared dataset a feature cache was made from."""
    data = features.manifest.get("provenance", {}).get("config", {}).get("data") if features else None
    if data and Path(data).suffix == ".json" and Path(data).is_file():
        return [data]
    for folder in ([Path(data), default_cache_root() / "data" / data] if data else []):
        if (folder / "captions_train.json").is_file():
            return [str(folder / "captions_train.json")]
    raise BlitextError("train-adapter needs captions: pass --captions FILE (a caption JSON whose image ids are "
                       "the feature cache's keys)")


EVERY_ID = "every id"  # read_pairs' `accepts` for a has_image that accepts every id


def read_pairs(caption_files: list[str], image_root: str | None, has_image, accepts: str | None = None) -> Pairs:
    """Every caption of an image that has_image(id) accepts, as compact columns, read row by row.

    `accepts`: a string that changes whenever has_image's answers may (CachedFeatures.accepts).
    Given it, the columns are parsed once per machine into files under the cache root and
    memory-mapped by every process (pair_store.py); None: parsed into this process's memory."""
    paths = expand_paths(caption_files)
    parse = lambda: _parse(paths, image_root, has_image, caption_files)  # noqa: E731
    if accepts is None:
        pairs = parse()
    else:
        from blitext.data import pair_store  # it builds Pairs: imported here, not above, to avoid a cycle
        pairs = pair_store.stored_pairs(pair_store.inputs(paths, image_root, accepts), parse)
    if pairs.blank:
        say(f"{pairs.blank} blank caption{'s' if pairs.blank != 1 else ''} skipped in {', '.join(map(str, paths))}")
    return pairs


def _parse(paths: list[Path], image_root: str | None, has_image, caption_files: list[str]) -> Pairs:
    columns = _PairColumns(has_image)
    for path in paths:
        columns.read(path, image_root)
    pairs = columns.pairs()
    if not len(pairs):
        raise BlitextError(f"no caption in {caption_files} has an image in the features: were they made from "
                           f"the same data? ({pairs.skipped} captions without features)")
    return pairs


class CachedFeatures:
    """Visual tokens read from a feature cache by image id."""

    def __init__(self, cache: FeatureCache):
        self.cache = cache
        self.producer = cache.producer
        self.width = cache.row_shape[-1]

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.cache

    @property
    def accepts(self) -> str:
        """Which ids have features, as a string that changes when they may: the key index's
        files (rewritten whenever the cache's keys change), for read_pairs' stored columns."""
        index = self.cache.root.resolve() / INDEX_DIR
        stats = [(index / name).stat() for name in INDEX_FILES]
        return " ".join([f"features {index}", *(f"{s.st_size}:{s.st_mtime_ns}" for s in stats)])

    def read(self, image_ids: list[str]):
        return self.cache.get_batch(image_ids)

    def encode(self, batch, device: str):
        feats, mask = batch
        return feats.to(device, non_blocking=True), None if mask is None else mask.to(device)


class OnlineFeatures:
    """The frozen vision encoder run on decoded images inside the loop (the reference code's way)."""

    def __init__(self, encoder, refs: Mapping[str, tuple[Path, str]] | None, threads: int):
        self.encoder = encoder
        self.producer = encoder.producer()
        self.width = encoder.token_shape()[1]
        self.refs = refs or {}
        self.pool = ThreadPoolExecutor(max(1, threads))

    def __contains__(self, image_id: str) -> bool:
        return True  # every captioned image is encoded; a bad file is an error naming it

    accepts = EVERY_ID  # read_pairs' stored columns: what __contains__ accepts

    def _pixels(self, image_id: str) -> torch.Tensor:
        root, ref = self.refs[image_id]
        return self.encoder.preprocess(load_image(root, ref))

    def read(self, image_ids: list[str]):
        try:
            return torch.stack(list(self.pool.map(self._pixels, image_ids)))
        except BadInputError as e:
            raise BlitextError(f"--online: {e}; fix or drop the image, or extract features first "
                               f"(extract-features skips and records bad images)") from None

    @torch.no_grad()  # not inference_mode: the features enter the differentiated Q-Former
    def encode(self, pixels: torch.Tensor, device: str):
        p = next(self.encoder.parameters())
        return self.encoder(pixels.to(device, p.dtype)).float(), None


