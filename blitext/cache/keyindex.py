"""The key index: a cache's keys found through memory-mapped files, not a per-process dict.

`index/` beside the shards holds four files, written once when the cache is finished:

- `keys.bin`     every key, UTF-8, in row order (row g = shard order, then row order);
- `offsets.npy`  (N + 1,) int64: key g is keys.bin[offsets[g]:offsets[g + 1]];
- `hashes.npy`   (N,) uint64: every key's 64-bit BLAKE2b hash, sorted;
- `rows.npy`     (N,) int64: the row g of each sorted hash.

A lookup is a binary search in `hashes.npy` and a comparison with the key stored at the row
found, so two keys with one hash are still told apart. Opening maps the files and reads
nothing: it costs the same at 10^3 and 10^8 rows, and every process (ranks, DataLoader
workers) shares the same page cache instead of building its own dict (885 MB per process at
4M keys; forked workers copy such a dict's pages as reference counts touch them).
"""
from __future__ import annotations

import bisect
import hashlib
import math
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Iterable

import numpy as np

from blitext.errors import BlitextError

INDEX_DIR = "index"
FILES = ("keys.bin", "offsets.npy", "hashes.npy", "rows.npy")
UPGRADE = "blitext cache upgrade"


def hash_bytes(key: bytes) -> int:
    """A UTF-8 key's 64-bit hash, the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def write_index(root: Path, shard_keys: Iterable[Sequence[str]]) -> dict:
    """Write `root/index/` from each shard's keys in shard order; returns its summary for the manifest.

    Files are written under temporary names and renamed, `hashes.npy` last: several processes
    upgrading one cache at once write the same bytes, and a reader never sees half a file."""
    folder = root / INDEX_DIR
    folder.mkdir(exist_ok=True)
    tmp = f".tmp{os.getpid()}"
    hashes, lengths = [], []
    with open(folder / ("keys.bin" + tmp), "wb") as blob:
        for keys in shard_keys:
            encoded = [k.encode() for k in keys]
            blob.write(b"".join(encoded))
            lengths.append(np.fromiter(map(len, encoded), np.int64, len(encoded)))
            hashes.append(np.fromiter(map(hash_bytes, encoded), np.uint64, len(encoded)))
    hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths) if lengths else [], dtype=np.int64)])
    rows = np.argsort(hashes, kind="stable")  # equal hashes keep row order: the first row wins, as in a shard
    arrays = {"offsets.npy": offsets.astype(np.int64), "rows.npy": rows.astype(np.int64), "hashes.npy": hashes[rows]}
    for name, array in arrays.items():
        with open(folder / (name + tmp), "wb") as f:
            np.save(f, array)
    for name in FILES:  # hashes.npy last: its presence says the others are complete
        os.replace(folder / (name + tmp), folder / name)
    return {"rows": len(hashes), "bytes": {name: (folder / name).stat().st_size for name in FILES}}


def index_problem(root: Path, summary: dict | None) -> str | None:
    """Why `root/index/` cannot be used as the manifest describes it, or None."""
    if not summary:
        return "it has no key index"
    for name, size in summary["bytes"].items():
        path = root / INDEX_DIR / name
        if not path.is_file():
            return f"its key index lacks {INDEX_DIR}/{name}"
        if path.stat().st_size != size:
            return f"its key index file {INDEX_DIR}/{name} is {path.stat().st_size:,} bytes, the manifest says {size:,}"
    return None


class KeyIndex(Sequence):
    """The keys of a cache in row order (a read-only sequence of str), with `locate(key)` -> row.

    Pickles as its folder: a spawned worker maps the files again instead of receiving a copy."""

    def __init__(self, root: str | Path, shard_rows: Sequence[int]):
        self.root = Path(root)
        self.shard_rows = list(shard_rows)
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_rows)]).tolist()  # O(shards)
        folder = self.root / INDEX_DIR
        self.hashes = _load(folder / "hashes.npy")
        self.rows = _load(folder / "rows.npy")
        self.offsets = _load(folder / "offsets.npy")
        self.blob = _map(folder / "keys.bin")
        # the same arrays as flat sequences of Python ints: bisect and indexing on these cost a
        # fraction of numpy's per-call overhead on scalars (a lookup is ~5 calls)
        self._hashes, self._rows, self._offsets = (_ints(a) for a in (self.hashes, self.rows, self.offsets))
        if len(self.hashes) != self.shard_starts[-1]:
            raise BlitextError(f"the key index of {self.root} holds {len(self.hashes):,} keys, the manifest "
                               f"{self.shard_starts[-1]:,}: run `{UPGRADE} {self.root}` to rebuild it")

    def __reduce__(self):
        return KeyIndex, (self.root, self.shard_rows)

    def __len__(self) -> int:
        return len(self.hashes)

    def key_at(self, g: int) -> str:
        return self._key_bytes(g).decode()

    def _key_bytes(self, g: int) -> bytes:
        return bytes(self.blob[self._offsets[g]:self._offsets[g + 1]])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.key_at(g) for g in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.key_at(i)

    def __iter__(self):
        blob, offsets = self.blob, self.offsets
        for start in range(0, len(self), 65536):  # offsets a block at a time: one numpy read per block
            block = offsets[start:start + 65537].tolist()
            for a, b in zip(block, block[1:]):
                yield bytes(blob[a:b]).decode()

    def __eq__(self, other) -> bool:
        if isinstance(other, KeyIndex):
            other = list(other)
        return isinstance(other, (list, tuple)) and len(other) == len(self) and list(self) == list(other)

    __hash__ = None

    def locate(self, key: str) -> int:
        """The row of `key` (shard order, then row order), or -1."""
        encoded = key.encode()
        h = hash_bytes(encoded)
        hashes, n = self._hashes, len(self._hashes)
        i = bisect.bisect_left(hashes, h, *self._window(h))
        while i < n and hashes[i] == h:
            g = self._rows[i]
            if self._key_bytes(g) == encoded:
                return g
            i += 1  # another key with the same hash
        return -1

    def _window(self, h: int) -> tuple[int, int]:
        """Where hash h sits in the sorted hashes: they are uniform over 64 bits, so near
        h / 2^64 * N, within a few sqrt(N) (the spread of uniform order statistics); the whole
        range when the bounds do not hold (a tiny or unusual index)."""
        hashes, n = self._hashes, len(self._hashes)
        guess, width = (h * n) >> 64, 4 * math.isqrt(n) + 64
        lo, hi = max(0, guess - width), min(n, guess + width)
        if (lo > 0 and hashes[lo - 1] >= h) or (hi < n and hashes[hi] < h):
            return 0, n
        return lo, hi

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and self.locate(key) >= 0

    def index(self, key, start: int = 0, stop: int | None = None) -> int:
        g = self.locate(key) if isinstance(key, str) else -1
        if g < 0 or g < start or (stop is not None and g >= stop):
            return super().index(key, start, len(self) if stop is None else stop)  # raises, or finds a duplicate
        return g

    def shard_row(self, g: int) -> tuple[int, int]:
        """Row g as (shard, row within the shard)."""
        shard = bisect.bisect_right(self.shard_starts, g) - 1
        return shard, g - self.shard_starts[shard]


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # numpy cannot map an empty array's zero data bytes
        return np.load(path)


def _ints(array: np.ndarray) -> memoryview:
    """A contiguous 64-bit integer array as a memoryview whose items are Python ints."""
    return memoryview(np.ascontiguousarray(array)).cast("B").cast("Q" if array.dtype.kind == "u" else "q")


def _map(path: Path) -> mmap.mmap | bytes:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def open_index(root: Path, manifest: dict) -> tuple[KeyIndex, dict]:
    """The cache's key index and its manifest; a cache without a usable index (made before it
    existed, or whose index was removed) gets one first, if its folder is writable."""
    problem = index_problem(root, manifest.get("index"))
    if problem:
        if not os.access(root, os.W_OK):
            raise BlitextError(f"{root} cannot be read: {problem} and the folder is read-only; run "
                               f"`{UPGRADE} {root}` once where it is writable (or copy it somewhere writable)")
        manifest = upgrade(root, manifest)
    return KeyIndex(root, [s["rows"] for s in manifest["shards"]]), manifest


def upgrade(root: Path, manifest: dict) -> dict:
    """(Re)write the key index and a manifest without per-row keys; returns that manifest."""
    from blitext.atomic import write_json, writing
    from blitext.cache.manifest import FORMAT, MANIFEST, shard_keys, sidecar_name

    shards = manifest["shards"]
    for i, entry in enumerate(shards):
        if "keys" not in entry and not (root / sidecar_name(i)).is_file():
            raise BlitextError(f"{root}: the keys of {entry['file']} are lost ({sidecar_name(i)} is missing), so its "
                               f"key index cannot be rebuilt; make the cache again")
    then = f"run `{UPGRADE} {root}` again"
    with writing(root, then):
        summary = write_index(root, (shard_keys(root, i, entry) for i, entry in enumerate(shards)))
        manifest = {**manifest, "format": FORMAT, "index": summary,
                    "shards": [{k: v for k, v in entry.items() if k != "keys"} for entry in shards]}
        write_json(root / MANIFEST, manifest)
    return manifest
