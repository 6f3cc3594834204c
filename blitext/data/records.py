"""What the readers return: one record per image (captions grouped) or per VQA question.

Image references are strings relative to a dataset root, so a prepared dataset can be moved
and a cache row key (`ImageRecord.id`) never depends on where the files lie. A reference is
either a plain relative path ("images/0.png") or a member of a webdataset tar shard
("shard-00000.tar#000123.jpg").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


def caption_key(image_id: str, index: int) -> str:
    """The id of an image's index-th caption: how prompt caches and feature caches are joined."""
    return f"{image_id}#{index}"


@dataclass(frozen=True)
class ImageRecord:
    id: str                        # stable key across runs; the cache row key (image_id)
    image: str                     # reference relative to the dataset root ("images/0.png", "a.tar#0.jpg")
    captions: tuple[str, ...] = ()  # human captions of this image, in file order
    # Extra per-image facts ({"category": "animals"}); not part of equality or hashing.
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class VQARecord:
    question_id: str
    image_id: str                  # matches ImageRecord.id of the same dataset
    image: str                     # reference relative to the dataset root; "" when the file gives none
    question: str
    answers: tuple[str, ...]       # the human answers (10 in VQAv2, 1 in GQA)
    answer_type: str | None = None  # VQAv2 "yes/no" / "number" / "other"; GQA's structural type


@dataclass
class ImageSet:
    root: Path                     # image references are resolved relative to this folder
    records: list[ImageRecord]     # one per unique image, captions grouped; file order (stable)
    source: str                    # what was read (a file, folder or glob), for messages and provenance
    blank_captions: int = 0        # blank captions skipped while reading; callers report them
    no_caption_rows: int = 0       # caption rows without a caption (key absent or null); callers report them

    def __len__(self) -> int:
        return len(self.records)
