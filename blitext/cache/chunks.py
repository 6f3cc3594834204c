"""Where a shard's rows lie in its file: its HDF5 chunk index walked (ChunkLayout), held in about
a byte per row (RowPlaces), or recorded once for the whole cache when it is finished
(recorded_places, written to index/places.npy by keyindex.py). Shard (shard.py) reads rows at
these offsets from a memory map; `blitext cache verify` checks the index against them."""
from __future__ import annotations

import array
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

# What h5py raises for a damaged file: HDF5's errors map onto these (a broken B-tree is a
# RuntimeError from chunk_iter, an unreadable object header a KeyError, a bad datatype a ValueError,
# an address past 2**63 an OverflowError).
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, OverflowError)

# HDF5's metadata cache, per open shard (while its chunk index is read, and for rows read through
# HDF5). Its default grows to 32 MB per file and holds about 8x its nominal size in memory: 34 MB
# per 10^5-row shard after a pass of reads through HDF5, in every process that reads the shard.
# 64 KiB holds a lookup's path through the chunk index, for about 20% more CPU time per HDF5 read.
METADATA_CACHE_BYTES = 64 * 1024


def open_h5(path: Path) -> h5py.File:
    """A shard opened with HDF5's metadata cache bounded (METADATA_CACHE_BYTES)."""
    file = h5py.File(path, "r")
    config = file.id.get_mdc_config()
    config.set_initial_size = True
    config.initial_size = config.max_size = METADATA_CACHE_BYTES
    config.min_size = min(config.min_size, METADATA_CACHE_BYTES)
    config.max_increment = min(config.max_increment, METADATA_CACHE_BYTES)
    file.id.set_mdc_config(config)
    return file


class ChunkLayout:
    """Where the shard's chunk index puts each chunk of `data` along its rows (blitext writes
    chunks that span whole rows: one row each, or 32 tokens of variable-length rows)."""

    def __init__(self, data: h5py.Dataset, file_size: int):
        self.per = data.chunks[0]  # rows (tokens) per chunk
        self.count = -(-data.shape[0] // self.per)
        self.address = np.full(self.count, -1, np.int64)  # byte offset of chunk i; -1: none usable
        self.why: dict[int, str] = {}  # chunk -> what is wrong with it
        self.raw = _raw_rows(data)  # one uncompressed row per chunk: a row is a slice of the file
        self.raw_size = raw_chunk_size(data)
        self.sizes_raw = True
        data.id.chunk_iter(lambda info: self._record(info, file_size))
        for i in range(self.count):
            if self.address[i] < 0:
                self.why.setdefault(i, "its chunk is missing from the shard's chunk index")

    def _record(self, info, file_size: int) -> None:
        index, rest = divmod(info.chunk_offset[0], self.per)
        if rest or any(info.chunk_offset[1:]) or not 0 <= index < self.count:
            return  # a chunk recorded where no row is: the row it belongs to shows up as missing
        # compared as Python ints: a damaged address can exceed int64 (and overflow numpy)
        if info.byte_offset is None or not 0 < info.byte_offset <= file_size - info.size:
            self.why[index] = f"its chunk address {info.byte_offset} lies outside the file ({file_size:,} bytes)"
        elif self.address[index] >= 0:
            self.why[index] = "the shard's chunk index holds its chunk twice"
        else:
            self.address[index] = info.byte_offset
            self.sizes_raw &= info.filter_mask == 0 and info.size == self.raw_size

    def damaged_rows(self, offsets: np.ndarray | None) -> dict[int, str]:
        """Rows touching a damaged chunk; `offsets`: variable-length rows' token starts (N + 1,)."""
        if not self.why:
            return {}
        if offsets is None:
            return {c * self.per + r: why for c, why in self.why.items() for r in range(self.per)}
        rows = {}
        for c, why in self.why.items():
            first = int(np.searchsorted(offsets, c * self.per, side="right")) - 1
            last = int(np.searchsorted(offsets, (c + 1) * self.per, side="left"))
            rows.update({r: why for r in range(max(0, first), min(last, len(offsets) - 1))})
        return rows

    def row_offsets(self) -> np.ndarray | None:
        """Each row's byte offset in the file when rows are raw one per chunk (-1 for a damaged
        row), else None (read through HDF5)."""
        if not (self.raw and self.sizes_raw):
            return None
        offsets = self.address.copy()
        offsets[list(self.why)] = -1  # a chunk held twice has an address, and is still damaged
        return offsets

    def row_places(self) -> "RowPlaces | None":
        """row_offsets, held in about a byte per row."""
        offsets = self.row_offsets()
        return RowPlaces(offsets) if offsets is not None else None


class RowPlaces:
    """`places[r]`: row r's byte offset. HDF5 writes one-row chunks one after another, broken
    only where it put a node of the chunk index (about every 60 rows), so the offsets are runs
    of evenly spaced rows, stored two ways:

    - per 32-row block, three numbers: its first row's offset, where in it a new run starts
      (32 if none) and that row's offset. A read looks at one block (one cache line), not a
      binary search over a shard's runs (~1,700 Python ints at 10^5 rows), which made
      Shard.start cost 1.1 us of CPU at 10^7 rows (100 shards) against 0.5 at 10^4: now 0.67
      and 0.47;
    - the runs themselves (first row, offset), for the rare block with two or more breaks.

    Any offsets are held exactly (a run is only as long as its rows' spacing is that of the
    shard's commonest step), in about a byte per row, where a Python int per row cost 36."""

    BLOCK_BITS = 5
    BLOCK = 1 << BLOCK_BITS

    def __init__(self, address: np.ndarray):
        steps = np.diff(address)
        values, counts = np.unique(steps, return_counts=True)
        self.step = int(values[np.argmax(counts)]) if len(values) else 0
        breaks = np.flatnonzero(steps != self.step) + 1  # rows that start a run, but row 0
        first = np.concatenate([[0], breaks]) if len(address) else np.zeros(0, np.int64)
        self.first = array.array("q", first.tolist())
        self.begin = array.array("q", address[first].tolist())
        self.blocks = array.array("q", self._blocks(address, breaks).reshape(-1).tolist())

    def _blocks(self, address: np.ndarray, breaks: np.ndarray) -> np.ndarray:
        blocks = np.zeros((-(-len(address) // self.BLOCK), 3), np.int64)
        blocks[:, 0] = address[::self.BLOCK]
        blocks[:, 1] = self.BLOCK
        inner = breaks[breaks % self.BLOCK != 0]  # a run starting at a block's first row changes nothing
        block, at = np.unique(inner >> self.BLOCK_BITS, return_index=True)
        per_block = np.bincount(inner >> self.BLOCK_BITS, minlength=len(blocks))
        blocks[block, 1] = inner[at] & (self.BLOCK - 1)
        blocks[block, 2] = address[inner[at]]
        blocks[per_block > 1, 2] = -1  # read from the runs
        return blocks

    def __getitem__(self, r: int) -> int:
        blocks, offset = self.blocks, r & (self.BLOCK - 1)
        i = 3 * (r >> self.BLOCK_BITS)
        run_start = blocks[i + 1]
        if offset < run_start:
            return blocks[i] + offset * self.step
        at = blocks[i + 2]
        if at >= 0:
            return at + (offset - run_start) * self.step
        return self._from_runs(r)  # a block with two or more breaks, or a damaged row (-1) at its break

    def _from_runs(self, r: int) -> int:
        k = bisect_right(self.first, r) - 1
        return self.begin[k] + (r - self.first[k]) * self.step


def chunk_layout(data: h5py.Dataset, file_size: int) -> ChunkLayout | None:
    """None for a layout blitext does not write (not chunked, or chunks split a row)."""
    if not _whole_row_chunks(data):
        return None
    return ChunkLayout(data, file_size)


def recorded_places(path: Path) -> np.ndarray | None:
    """What index/places.npy records of a finished shard: each row's byte offset (int64, -1 for a
    damaged row), or None where its rows are not read from the memory map (the layout decides:
    a raw row in each chunk). Walks the shard's chunk index: 2.5-4.4 us a row (docs/scale.md)."""
    with open_h5(path) as file:
        data = file.get("data")
        if data is None:
            return np.zeros(0, np.int64)
        if not isinstance(data, h5py.Dataset) or not mapped_layout(data):
            return None
        return ChunkLayout(data, path.stat().st_size).row_offsets()


def _whole_row_chunks(data: h5py.Dataset) -> bool:
    return data.chunks is not None and data.chunks[1:] == data.shape[1:]


def mapped_layout(data: h5py.Dataset) -> bool:
    """Whether the dataset's rows can be read from the memory map: one per chunk, stored raw
    (a chunk's stored size is checked too, where the chunk index is read)."""
    return _whole_row_chunks(data) and _raw_rows(data)


def _raw_rows(data: h5py.Dataset) -> bool:
    if data.chunks[0] != 1:
        return False
    return not (data.compression or data.shuffle or data.scaleoffset is not None)  # Fletcher-32 keeps the bytes


def raw_chunk_size(data: h5py.Dataset) -> int:
    """A chunk's bytes when HDF5 stored it unfiltered: its values, then its checksum if it has one."""
    return data.dtype.itemsize * int(np.prod(data.chunks)) + 4 * data.fletcher32


def write_places(path: Path, shards: Sequence[tuple[Path, int]]) -> bool:
    """index/places.npy (keyindex.py's docstring) at `path`, a shard at a time. This walks every
    shard's chunk index once, here, where each reading process walked it before: 2.5-4.4 us a row (docs/scale.md),
    5-10 minutes at 129M rows, for the one process finishing the cache. False, with nothing
    left at `path`, where a shard's rows are not read from a memory map, or its HDF5 metadata does
    not read or disagrees with the manifest: readers then walk that cache, and name any damage."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.dtype(np.int64).str, "fortran_order": False, "shape": (sum(n for _, n in shards),)})
        for file, rows in shards:
            places = _shard_places(file, rows)
            if places is None:
                break
            f.write(places.astype("<i8").tobytes())
        else:
            return True
    path.unlink()
    return False


def _shard_places(file: Path, rows: int) -> np.ndarray | None:
    """recorded_places of a shard holding `rows` rows, or None (not mapped, or its metadata damaged)."""
    try:
        places = recorded_places(file)
    except H5_ERRORS:
        return None
    return places if places is not None and len(places) == rows else None


def int_items(array: np.ndarray) -> memoryview:
    """A 64-bit integer array as a flat memoryview whose items are Python ints: indexing it costs
    a fraction of numpy's per-call overhead on scalars, and a memory map stays a memory map."""
    return memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B").cast("Q" if array.dtype.kind == "u" else "q")
