"""Training pairs for the adaptor: captions joined to visual features by image id.

A caption file's records give (image id, captions); a pair is one caption, keyed
`<image_id>#k` as the prompt cache keys it. Its visual input comes from a feature source:
`CachedFeatures` (rows of an extract-features cache) or `OnlineFeatures` (the frozen encoder
run on the decoded image inside the loop, as the reference code does).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from blitext.cache import FeatureCache
from blitext.config import default_cache_root
from blitext.console import say
from blitext.data.images import load_image
from blitext.data.readers import read_image_set
from blitext.data.text import caption_key, expand_paths
from blitext.errors import BadInputError, BlitextError


@dataclass
class Pairs:
    """Image-caption pairs, joined by key: caption key `<image_id>#k` -> image id -> features."""
    keys: list[str]
    image_ids: list[str]
    texts: list[str]
    image_refs: dict[str, tuple[Path, str]]  # image id -> (root, reference), for --online
    skipped: int = 0                         # captions whose image has no features (failed extraction)
    blank: int = 0                           # blank captions the readers skipped (reported once)
    no_caption: int = 0                      # caption rows without a caption (in the run's end line)

    def __len__(self) -> int:
        return len(self.keys)


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


def read_pairs(caption_files: list[str], image_root: str | None, has_image) -> Pairs:
    keys, image_ids, texts, refs, skipped, blank, no_caption = [], [], [], {}, 0, 0, 0
    paths = expand_paths(caption_files)
    for path in paths:
        image_set = read_image_set(path, image_root)
        blank += image_set.blank_captions
        no_caption += image_set.no_caption_rows
        for rec in image_set.records:
            for k, caption in enumerate(rec.captions):  # the readers dropped (and counted) blank ones
                if not has_image(rec.id):
                    skipped += 1
                    continue
                keys.append(caption_key(rec.id, k))
                image_ids.append(rec.id)
                texts.append(caption.strip())
                refs[rec.id] = (image_set.root, rec.image)
    if blank:
        say(f"{blank} blank caption{'s' if blank != 1 else ''} skipped in {', '.join(map(str, paths))}")
    if not keys:
        raise BlitextError(f"no caption in {caption_files} has an image in the features: were they made from "
                           f"the same data? ({skipped} captions without features)")
    return Pairs(keys, image_ids, texts, refs, skipped, blank, no_caption)


class CachedFeatures:
    """Visual tokens read from a feature cache by image id."""

    def __init__(self, cache: FeatureCache):
        self.cache = cache
        self.producer = cache.producer
        self.width = cache.row_shape[-1]

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.cache

    def read(self, image_ids: list[str]):
        return self.cache.get_batch(image_ids)

    def encode(self, batch, device: str):
        feats, mask = batch
        return feats.to(device, non_blocking=True), None if mask is None else mask.to(device)


class OnlineFeatures:
    """The frozen vision encoder run on decoded images inside the loop (the reference code's way)."""

    def __init__(self, encoder, refs: dict[str, tuple[Path, str]] | None, threads: int):
        self.encoder = encoder
        self.producer = encoder.producer()
        self.width = encoder.token_shape()[1]
        self.refs = refs or {}
        self.pool = ThreadPoolExecutor(max(1, threads))

    def __contains__(self, image_id: str) -> bool:
        return True  # every captioned image is encoded; a bad file is an error naming it

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


