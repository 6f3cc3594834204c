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
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from blitext.data.columns import StringBuilder, StringColumn
from blitext.data.readers import read_image_set
from blitext.data.records import caption_key
from blitext.errors import BlitextError

TEXT_KEYS = ("text", "caption", "sentence")
WORDNET_DIR = Path("/usr/share/wordnet")  # Debian wordnet-base: data.noun/.verb/.adj/.adv


class TextCorpus:
    """Sentences and their ids in file order, as compact string columns (columns.py): a
    12M-sentence corpus is ~80 B per sentence (its text and id as UTF-8, two offsets), not two
    Python str objects and their list slots (~190 B) in every rank."""

    def __init__(self):
        self._ids, self._sentences = StringBuilder(), StringBuilder()
        # sentences read, empty lines skipped, lines with replaced bytes, caption rows without a caption
        self.counts: Counter = Counter()
        self.files: list[str] = []

    def add(self, key: str, sentence: str) -> None:
        self._ids.append(key)
        self._sentences.append(sentence)
        self.counts["sentences"] += 1

    @property
    def ids(self) -> StringColumn:
        return self._ids.column()

    @property
    def sentences(self) -> StringColumn:
        return self._sentences.column()

    def __len__(self) -> int:
        return len(self._sentences.offsets) - 1

    def nbytes(self) -> int:
        """What the columns hold: the UTF-8 of every id and sentence and their offsets."""
        return self.ids.nbytes + self.sentences.nbytes


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
    if not len(corpus):
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


# ---------------------------------------------------------------- whole-column questions, without a set of str
# A Python set or sorted list of 12M sentences holds ~1-2 GB of str objects in every rank; these
# answer the same questions from 8-byte hashes and prefixes in numpy, checking every hash match
# against the strings, so their answers equal the set's.

def string_hashes(strings: Sequence[str]) -> np.ndarray:
    """Python's hash of each string (salted per process: compare within one process only)."""
    return np.fromiter(map(hash, strings), np.int64, len(strings))


def first_copy_of(strings: Sequence[str]) -> np.ndarray:
    """For each string, the index of its first copy: equal strings get one number, different
    strings different ones (what a dict numbering them gives, without the dict)."""
    hashes = string_hashes(strings)
    _, first, group = np.unique(hashes, return_index=True, return_inverse=True)
    out = first[group.reshape(-1)]
    copies = np.flatnonzero(out != np.arange(len(strings)))
    clashes = [i for i in copies.tolist() if strings[i] != strings[int(out[i])]]
    if clashes:  # different strings with one hash (~1 in 10^5 at 12M strings): tell them apart by text
        by_text: dict[str, int] = {}
        for i in np.flatnonzero(np.isin(group, group[clashes])).tolist():
            out[i] = by_text.setdefault(strings[i], i)
    return out


def first_copies(strings: Sequence[str]) -> np.ndarray:
    """The index of each distinct string's first copy, ascending: what a set would keep."""
    return np.flatnonzero(first_copy_of(strings) == np.arange(len(strings)))


def first_repeat(column: Sequence[str]) -> str | None:
    """The first string met a second time in the column, or None."""
    first = first_copies(column)
    gaps = np.flatnonzero(first != np.arange(len(first)))  # first copies are 0, 1, ... until the first repeat
    repeat = int(gaps[0]) if len(gaps) else len(first)
    return column[repeat] if repeat < len(column) else None


def sorted_distinct_at(column: StringColumn, distinct: np.ndarray, ranks: list[int]) -> list[str]:
    """sorted(set(column))[r] for each r, where `distinct` indexes one copy of each distinct string.

    Strings are ordered by their first 8 UTF-8 bytes in numpy (zero-padded, big-endian: that
    order agrees with str's), and only the runs of equal prefixes that hold an asked rank are
    sorted as Python strings (UTF-8 byte order is code point order)."""
    prefixes = _prefixes(column, distinct)
    order = np.argsort(prefixes, kind="stable")
    ordered = prefixes[order]
    runs: dict[int, list[str]] = {}
    out = []
    for r in ranks:
        lo = int(np.searchsorted(ordered, ordered[r], "left"))
        if lo not in runs:
            hi = int(np.searchsorted(ordered, ordered[r], "right"))
            runs[lo] = sorted(column[i] for i in distinct[order[lo:hi]].tolist())
        out.append(runs[lo][r - lo])
    return out


def _prefixes(column: StringColumn, rows: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each string as a big-endian uint64, zero-padded."""
    blob = np.frombuffer(column.blob, np.uint8)
    starts, ends = column.offsets[:-1][rows], column.offsets[1:][rows]
    out = np.zeros(len(rows), np.uint64)
    for j in range(8):
        at = starts + j
        inside = at < ends
        byte = np.zeros(len(rows), np.uint64)
        byte[inside] = blob[at[inside]]
        out = out << np.uint64(8) | byte
    return out
