"""Sentences for the text-only stage: plain text, JSONL and caption JSON files, with ids (and WordNet's examples).

Nothing is dropped silently: empty lines are skipped and counted, undecodable bytes are an
error naming the file and line (or, with bad_bytes="replace", replaced and counted), and
each sentence keeps a stable id so prompt caches can be joined to images by key.
"""
from __future__ import annotations

import glob
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from blitext.data.readers import read_image_set
from blitext.errors import BlitextError

TEXT_KEYS = ("text", "caption", "sentence")
WORDNET_DIR = Path("/usr/share/wordnet")  # Debian wordnet-base: data.noun/.verb/.adj/.adv


def caption_key(image_id: str, index: int) -> str:
    """The id of an image's index-th caption: how prompt caches and feature caches are joined."""
    return f"{image_id}#{index}"


@dataclass
class TextCorpus:
    ids: list[str] = field(default_factory=list)
    sentences: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)   # read, empty lines skipped, lines with replaced bytes,
                                                       # caption rows without a caption
    files: list[str] = field(default_factory=list)

    def add(self, key: str, sentence: str) -> None:
        self.ids.append(key)
        self.sentences.append(sentence)
        self.counts["sentences"] += 1

    def __len__(self) -> int:
        return len(self.sentences)


def expand_paths(patterns: list[str] | str) -> list[Path]:
    if isinstance(patterns, str):
        patterns = [patterns]
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise BlitextError(f"--text {pattern!r} matches no file")
        for m in matches:
            if not Path(m).is_file():
                raise BlitextError(f"--text {m!r} is not a file (plain text, .jsonl or caption .json)")
            paths.append(Path(m))
    return paths


def read_sentences(patterns: list[str] | str, bad_bytes: str = "error") -> TextCorpus:
    """Every sentence of the given files, in order; ids are `<file>:<line>` or caption keys."""
    if bad_bytes not in ("error", "replace"):
        raise BlitextError(f"bad_bytes must be 'error' or 'replace', got {bad_bytes!r}")
    corpus = TextCorpus()
    for path in expand_paths(patterns):
        corpus.files.append(str(path))
        if path.suffix == ".json":
            _read_caption_json(path, corpus)
        else:
            _read_lines(path, corpus, bad_bytes)
    if not corpus.sentences:
        raise BlitextError(f"no sentences in {', '.join(corpus.files)} ({dict(corpus.counts)})")
    return corpus


def _read_caption_json(path: Path, corpus: TextCorpus) -> None:
    image_set = read_image_set(path)
    corpus.counts["empty skipped"] += image_set.blank_captions  # the reader dropped them; report them
    corpus.counts["rows without caption"] += image_set.no_caption_rows
    for record in image_set.records:
        for k, caption in enumerate(record.captions):
            if caption.strip():
                corpus.add(caption_key(record.id, k), caption.strip())
            else:
                corpus.counts["empty skipped"] += 1


def _read_lines(path: Path, corpus: TextCorpus, bad_bytes: str) -> None:
    jsonl = path.suffix == ".jsonl"
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            text = _decode(raw, where, bad_bytes, corpus)
            if jsonl and text.strip():
                text = _jsonl_text(text, where)
            text = text.strip()
            if not text:
                corpus.counts["empty skipped"] += 1
                continue
            corpus.add(f"{path.name}:{number}", text)


def _decode(raw: bytes, where: str, bad_bytes: str, corpus: TextCorpus) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if bad_bytes == "replace":
            corpus.counts["lines with replaced bytes"] += 1
            return raw.decode("utf-8", errors="replace")
        raise BlitextError(
            f"{where}: bytes {raw[e.start:e.end]!r} at column {e.start + 1} are not UTF-8; re-encode the file "
            f"(e.g. iconv -f latin1 -t utf-8) or pass --bad-bytes replace"
        ) from None


def _jsonl_text(line: str, where: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BlitextError(f"{where}: not valid JSON ({e.msg})") from None
    if isinstance(obj, str):
        return obj
    for key in TEXT_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), str):
            return obj[key]
    raise BlitextError(f"{where}: a JSONL line needs one of the keys {list(TEXT_KEYS)}")


def wordnet_examples(folder: Path = WORDNET_DIR) -> list[str]:
    """The quoted example sentences of WordNet's glosses ("heave a sigh; \"She sighed sadly\""), unique."""
    sentences: dict[str, None] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        path = folder / f"data.{pos}"
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.startswith(" "):  # the licence header lines start with spaces
                sentences.update((s.strip(), None) for s in re.findall(r'"([^"]+)"', line.partition(" | ")[2]))
    return [s for s in sentences if s]
