"""The key index: a cache's keys found through memory-mapped files, not a per-process dict.

`index/` beside the shards holds these files, written once when the cache is finished:

- `keys.bin`     every key, UTF-8, in row order (row g = shard order, then row order);
- `offsets.npy`  (N + 1,) int64: key g is keys.bin[offsets[g]:offsets[g + 1]];
- `slots.npy`    (S, 3) uint64: a hash table of records (hash high, row g, hash low), one per key,
                 in order of their 128-bit BLAKE2b hashes (high 64 bits, then low);
- `places.npy`   (N,) int64, only where rows are read from memory maps (fixed-length rows, a raw
                 row in each chunk): row g's byte offset in its shard file, -1 for a row whose
                 chunk was missing or outside the file. A shard opened for reading takes its
                 rows' places from here instead of walking its HDF5 chunk index (chunks.py), so no
                 process spends 2.5-4.4 us a row on that walk or holds the places itself. Caches
                 without it (other layouts, or made before it) read as before: it is optional.

A key's home slot is the top bits of its hash (2^bits slots for N keys, bits the fewest that
keep them at most 80% full). Records are laid in hash order, each at its home or, when that is
taken, in the slot after the record before it (linear probing that keeps the order); a free
slot holds a copy of the next record, whose home lies past that slot, so its hash is above that
of any key homed at or before it. A lookup scans from its home while hashes are smaller and
takes the record whose 128 bits equal its key's. The key's bytes are not compared: two keys of
one 128-bit hash are refused when the index is written (a chance of about N^2 / 2^129, 10^-23 at
10^8 keys), and a key the cache lacks matches one it holds with a chance of N / 2^128 a lookup.
So a lookup touches one far place in the files, its home slot (usually with its record), where
format 3's index (64-bit hashes, each key's bytes compared) touched two and a binary search over
sorted hashes ~15 and then three more. bench/scale.py, this index against format 3's on one
day (WINDOW 4): batches of 512 keys 0.62-0.64 us a key at 10^4 rows (0.90), at 10^7 rows
0.91-0.96 of that rate (0.87-0.89); one key at a time 0.86-0.88 (0.73-0.74). With WINDOW 8:
0.61-0.72 us a key from 10^4 to 10^7 rows (docs/scale.md).

`locate_many` finds a batch of keys at once (how get_batch and a DataLoader's batches read):
their hashes in one pass, then numpy gathers over the slots, each preceded by a gather of one
item per key, so that the batch's far touches are in memory's hands together rather than one
after another.

Opening maps the files and reads nothing: it costs the same at 10^3 and 10^8 rows, and every
process (ranks, DataLoader workers) shares the same page cache instead of building its own
dict (885 MB per process at 4M keys; forked workers copy such a dict's pages as reference
counts touch them). The slots take 24 bytes per key at 40-80% load: 30-60 B, beside the key
and its offset.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Iterable

import numpy as np

from blitext.cache.chunks import int_items, write_places
from blitext.cache.manifest import FORMAT, MANIFEST, shard_keys, sidecar_name
from blitext.errors import BlitextError

INDEX_DIR = "index"
FILES = ("keys.bin", "offsets.npy", "slots.npy")  # written in this order: slots.npy last
PLACES = "places.npy"  # optional (module docstring): listed in the manifest's index summary where written
OLD_FILES = ("hashes.npy", "rows.npy")  # the layout before slots.npy (sorted hashes, binary search)
UPGRADE = "blitext cache upgrade"
HIGH, ROW, LOW = range(3)  # a record's items in slots.npy
# slots locate_many reads from a key's home at a time: a longer walk costs another round of gathers
# (at 76% full, 14% of keys walk past 4 slots, 2% past 8); 8 was as fast as or faster than 4 and 6
# at every size (bench/scale_rates.py --windows, docs/scale.md)
WINDOW = 8


def hash_bytes(key: bytes) -> tuple[int, int]:
    """A UTF-8 key's 128-bit hash as (high, low) 64-bit halves, the same in every process
    (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(key, digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def hash_many(keys: list[bytes]) -> np.ndarray:
    """hash_bytes of each key, as (N, 2) uint64: the digests joined, without a Python int per key."""
    blake2b = hashlib.blake2b
    joined = b"".join([blake2b(k, digest_size=16).digest() for k in keys])
    return np.frombuffer(joined, "<u8").astype(np.uint64).reshape(-1, 2)


def slot_bits(n: int) -> int:
    """The fewest bits whose 2^bits home slots hold n keys at most 80% full."""
    return (-(-n * 5 // 4) - 1).bit_length() if n else 0


def write_index(root: Path, shard_keys: Iterable[Sequence[str]], shards: Sequence[tuple[Path, int]] | None = None) -> dict:
    """Write `root/index/` from each shard's keys in shard order; returns its summary for the manifest.
    `shards`: each shard's file and rows, for places.npy (None: rows of variable length, none written).

    Files are written under temporary names and renamed, `slots.npy` last: several processes
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
            hashes.append(hash_many(encoded))
    hashes = np.concatenate(hashes) if hashes else np.zeros((0, 2), np.uint64)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths) if lengths else [], dtype=np.int64)])
    offsets = offsets.astype(np.int64)
    key_at = functools.partial(_key_in, folder / ("keys.bin" + tmp), offsets)
    arrays = {"offsets.npy": offsets, "slots.npy": slot_table(hashes, key_at, root)}
    for name, array in arrays.items():
        with open(folder / (name + tmp), "wb") as f:
            np.save(f, array)
    written = list(FILES)
    if shards is not None and write_places(folder / (PLACES + tmp), shards):
        written.insert(-1, PLACES)
    for name in written:  # slots.npy last: its presence says the others are complete
        os.replace(folder / (name + tmp), folder / name)
    for name in (*OLD_FILES, *[PLACES] * (PLACES not in written)):
        (folder / name).unlink(missing_ok=True)
    return {"rows": len(hashes), "bytes": {name: (folder / name).stat().st_size for name in written}}


def placed_shards(root: Path, entries: Sequence[dict], variable_length: bool) -> list[tuple[Path, int]] | None:
    """write_index's `shards` from the manifest's shard entries: none for rows of variable length."""
    return None if variable_length else [(root / entry["file"], entry["rows"]) for entry in entries]


def slot_table(hashes: np.ndarray, key_at, root: Path) -> np.ndarray:
    """slots.npy (module docstring) for keys in row order with these (N, 2) hashes; key_at(g) is
    key g's bytes, read only for the keys whose whole hash another key shares."""
    order = np.lexsort((hashes[:, 1], hashes[:, 0]))  # stable: equal hashes keep row order, the first row wins
    records = np.empty((len(order), 3), np.uint64)
    records[:, HIGH], records[:, ROW], records[:, LOW] = hashes[order, 0], order, hashes[order, 1]
    _refuse_shared_hashes(records, key_at, root)
    places = _places(records[:, HIGH], slot_bits(len(order)))
    if not len(places):
        return records
    # every slot up to the last record's holds the record placed there or, if free, the next one
    return records[np.searchsorted(places, np.arange(places[-1] + 1))]


def _refuse_shared_hashes(records: np.ndarray, key_at, root: Path) -> None:
    """Lookups trust the 128-bit hash (module docstring), so two different keys that share one
    are refused; the same key twice shares it rightly (its first row is found)."""
    shared = np.flatnonzero((records[1:, HIGH] == records[:-1, HIGH]) & (records[1:, LOW] == records[:-1, LOW]))
    for i in shared.tolist():
        first, second = key_at(int(records[i, ROW])), key_at(int(records[i + 1, ROW]))
        if first != second:
            raise BlitextError(f"{root}: keys {first.decode()!r} and {second.decode()!r} share one 128-bit "
                               f"BLAKE2b hash, which the key index cannot tell apart; rename one of them")


def _key_in(path: Path, offsets: np.ndarray, g: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(int(offsets[g]))
        return f.read(int(offsets[g + 1] - offsets[g]))


def _places(sorted_hashes: np.ndarray, bits: int) -> np.ndarray:
    """Each record's slot: its home (the top `bits` bits of its hash) or, if the record before
    it sits there or beyond, the slot after that one."""
    rank = np.arange(len(sorted_hashes))
    home = (sorted_hashes >> np.uint64(64 - bits)).astype(np.int64) if bits else np.zeros_like(rank)
    return rank + np.maximum.accumulate(home - rank)


def index_problem(root: Path, summary: dict | None) -> str | None:
    """Why `root/index/` cannot be used as the manifest describes it, or None."""
    if not summary:
        return "it has no key index"
    missing = [name for name in FILES if name not in summary["bytes"]]
    if missing:
        return f"its key index is of an older layout (without {INDEX_DIR}/{missing[0]})"
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
        self._per_shard = _even_rows(self.shard_rows)
        folder = self.root / INDEX_DIR
        self.slots = _load(folder / "slots.npy")
        self.offsets = _load(folder / "offsets.npy")
        self.blob = _map(folder / "keys.bin")
        # the same arrays as flat sequences of Python ints: indexing these costs a fraction of
        # numpy's per-call overhead on scalars (a lookup reads ~4 items)
        self._slots, self._offsets = int_items(self.slots), int_items(self.offsets)
        # for locate_many's gathers: a plain 1-D array (np.take on it is numpy's fast path, where
        # rows of a 2-D np.memmap cost ~100 ns each in numpy's overhead alone)
        self._flat_slots = self.slots.view(np.ndarray).reshape(-1)
        if len(self) != self.shard_starts[-1]:
            raise BlitextError(f"the key index of {self.root} holds {len(self):,} keys, the manifest "
                               f"{self.shard_starts[-1]:,}: run `{UPGRADE} {self.root}` to rebuild it")
        self._shift = 64 - slot_bits(len(self))

    def __reduce__(self):
        return KeyIndex, (self.root, self.shard_rows)

    def __len__(self) -> int:
        return len(self.offsets) - 1

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
        high, low = hash_bytes(key.encode())
        slots = self._slots
        i = 3 * (high >> self._shift)  # its home slot: slots is flat, 3 items a slot
        try:  # costs nothing unless raised: by a lookup that runs past the last record
            while slots[i] < high:  # records homed before its home, pushed up to here
                i += 3
            while slots[i] == high:
                if slots[i + LOW] == low:
                    return slots[i + ROW]
                i += 3  # another key whose hash has the same high half
        except IndexError:  # no record at or after its home holds its hash
            pass
        return -1

    def locate_many(self, keys: Sequence[str]) -> np.ndarray:
        """The rows of `keys` (int64, -1 for a missing key), each what locate() gives.

        A batch's far touches (home slots) are numpy gathers, so the CPU has many of them in
        flight at once, where locate() waits for each in turn (module docstring). A key whose
        hash's high half another key shares, rare, is finished by locate()."""
        hashes = hash_many([k.encode() for k in keys])
        rows = np.full(len(hashes), -1, np.int64)
        if not len(rows) or not len(self.slots):
            return rows
        high = hashes[:, 0]
        at = (high >> np.uint64(self._shift)).astype(np.int64)  # homes: a non-empty index has shift <= 63
        todo, found, places = np.arange(len(rows)), [], []
        last, flat, step = len(self.slots) - 1, self._flat_slots, np.arange(WINDOW)
        while len(todo):  # each key's walk from its home, WINDOW slots at a time
            window = at[todo, None] + step
            inside = window <= last  # past the last record: missing
            window = np.minimum(window, last)
            # each key's first slot alone first, one item per key: the CPU then has many keys'
            # far cache lines in flight, where the gather below would wait for each in turn
            np.take(flat, 3 * window[:, 0])
            seen = np.take(flat, 3 * window)  # the slots' high halves (keys, WINDOW)
            below = inside & (seen < high[todo, None])
            walked_past = below.all(axis=1)
            each, stop = np.arange(len(todo)), np.argmin(below, axis=1)  # the first slot not below
            hit = ~walked_past & inside[each, stop] & (seen[each, stop] == high[todo])
            found.append(todo[hit])
            places.append(window[each, stop][hit])
            todo = todo[walked_past]
            at[todo] += WINDOW
        which, places = np.concatenate(found), np.concatenate(places)
        same = np.take(flat, 3 * places + LOW) == hashes[which, 1]
        rows[which[same]] = np.take(flat, 3 * places[same] + ROW).astype(np.int64)
        for i in which[~same].tolist():  # the first record of its high half is another key's
            rows[i] = self.locate(keys[i])
        return rows

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and self.locate(key) >= 0

    def index(self, key, start: int = 0, stop: int | None = None) -> int:
        g = self.locate(key) if isinstance(key, str) else -1
        if g < 0 or g < start or (stop is not None and g >= stop):
            return super().index(key, start, len(self) if stop is None else stop)  # raises, or finds a duplicate
        return g

    def shard_row_many(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """shard_row of each of `rows`, as two arrays."""
        if self._per_shard:
            return np.divmod(rows, self._per_shard)
        shards = np.searchsorted(self.shard_starts, rows, side="right") - 1
        return shards, rows - np.asarray(self.shard_starts)[shards]

    def shard_row(self, g: int) -> tuple[int, int]:
        """Row g as (shard, row within the shard)."""
        if self._per_shard:
            return divmod(g, self._per_shard)
        shard = bisect.bisect_right(self.shard_starts, g) - 1
        return shard, g - self.shard_starts[shard]


def _even_rows(shard_rows: list[int]) -> int:
    """The rows of every shard but the last, if they all hold that many and the last no more
    (as blitext writes them), else 0: then a row's shard is a division, not a search."""
    per = shard_rows[0] if shard_rows else 0
    if per and all(n == per for n in shard_rows[:-1]) and shard_rows[-1] <= per:
        return per
    return 0


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # numpy cannot map an empty array's zero data bytes
        return np.load(path)


def _map(path: Path) -> mmap.mmap | bytes:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def load_places(root: Path, manifest: dict) -> np.ndarray | None:
    """places.npy, mapped, where the manifest lists it (open_index has checked its size), else None."""
    summary = manifest.get("index") or {}
    if PLACES not in summary.get("bytes", {}):
        return None
    places = _load(root / INDEX_DIR / PLACES)
    return places if places.dtype == np.int64 and places.shape == (summary["rows"],) else None


def open_index(root: Path, manifest: dict) -> tuple[KeyIndex, dict]:
    """The cache's key index and its manifest; a cache without a usable index (made before it
    existed, or whose index was removed) gets one first, if its folder is writable."""
    problem = index_problem(root, manifest.get("index"))
    if not problem and manifest.get("format") != FORMAT:
        problem = f"its format is {manifest.get('format')!r}, before {FORMAT!r}"
    if problem:
        if not os.access(root, os.W_OK):
            raise BlitextError(f"{root} cannot be read: {problem} and the folder is read-only; run "
                               f"`{UPGRADE} {root}` once where it is writable (or copy it somewhere writable)")
        manifest = upgrade(root, manifest)
    return KeyIndex(root, [s["rows"] for s in manifest["shards"]]), manifest


def upgrade(root: Path, manifest: dict) -> dict:
    """(Re)write the key index and a manifest without per-row keys; returns that manifest."""
    from blitext.atomic import write_json, writing

    shards = manifest["shards"]
    for i, entry in enumerate(shards):
        if "keys" not in entry and not (root / sidecar_name(i)).is_file():
            raise BlitextError(f"{root}: the keys of {entry['file']} are lost ({sidecar_name(i)} is missing), so its "
                               f"key index cannot be rebuilt; make the cache again")
    then = f"run `{UPGRADE} {root}` again"
    with writing(root, then):
        summary = write_index(root, (shard_keys(root, i, entry) for i, entry in enumerate(shards)),
                              placed_shards(root, shards, manifest.get("variable_length")))
        manifest = {**manifest, "format": FORMAT, "index": summary,
                    "shards": [{k: v for k, v in entry.items() if k != "keys"} for entry in shards]}
        write_json(root / MANIFEST, manifest)
    return manifest
