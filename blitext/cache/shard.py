"""One shard of a cache, opened for reading in one process: where its rows are, which rows are
damaged, which this process has checked, and the memory map the rows are copied from.
FeatureCache (reader.py) opens one per shard on the shard's first read."""
from __future__ import annotations

import array
import functools
import mmap
import threading
from bisect import bisect_right
from pathlib import Path

import h5py
import numpy as np

from blitext.cache.quantise import dequantise

# What h5py raises for a damaged file: HDF5's errors map onto these (a broken B-tree is a
# RuntimeError from chunk_iter, an unreadable object header a KeyError, a bad datatype a ValueError,
# an address past 2**63 an OverflowError).
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, OverflowError)

# HDF5's metadata cache, per open shard (while its chunk index is read, and for rows read through
# HDF5). Its default grows to 32 MB per file and holds about 8x its nominal size in memory: 34 MB
# per 10^5-row shard after a pass of reads through HDF5, in every process that reads the shard.
# 64 KiB holds a lookup's path through the chunk index, for about 20% more CPU time per HDF5 read.
METADATA_CACHE_BYTES = 64 * 1024


class Shard:
    """One open shard. Uncompressed one-row chunks sit at fixed byte offsets in the file, so
    once those are known a row is a plain slice of a memory map: h5py's per-read selection
    costs far more than copying a 100 KB row (bench/cache_read.py).

    A cache finished since index/places.npy exists (keyindex.py) lists every row's offset there,
    found by one pass over each shard's HDF5 chunk index when the cache was finished: the shard
    takes its slice of that map, checks that its first row's chunk is where it says (a shard
    replaced since is walked as below), and holds no offsets of its own. Rows the pass found damaged are -1 there, and refused when read.

    Without places.npy (older caches), the shard walks its chunk index itself, in every process
    that opens it (2.5-4.4 us a row), which also checks the index against the layout written: a
    row whose chunk is absent, or whose chunk address lies outside the file, is damaged (HDF5
    would read an absent chunk as the fill value, zeros, with no checksum to fail) and is
    refused when read. Damage to the chunk index after places.npy was written does not matter
    to a read from the map: a row's bytes are where they were, and checked (`blitext cache
    verify` still names it).

    A row's first read in this process checks its bytes in the map against the Fletcher-32
    checksum stored after them (the sums HDF5 computes: fletcher32_values); later reads copy
    the same, now checked, bytes. Computing a checksum costs as much as the copy itself, so
    checking every read would halve the read rate. Shards written without checksums are read
    unchecked.

    Once the places are known the HDF5 file is closed: an open HDF5 file holds 0.5-1 MB (its
    metadata cache), and a process reading a cache of 1,024-row shards opens thousands. (It is
    still opened, briefly, for the dataset's shape, dtype and checksum flag and an int8 store's
    scales: a cost per shard, not per row.) What stays per row is one bit (checked or not),
    plus, without places.npy, a share of runs of evenly spaced chunks (RowPlaces): about a byte,
    where a Python int per row and HDF5's default caches cost 270 bytes in every DataLoader
    worker. Rows of other layouts (variable length, compressed) are read through HDF5, which
    keeps the file open.

    An int8 store's rows (quantise.py) are checked as stored, then dequantised to `dtype` with
    their row's scale. The scales (dataset `scale`, one chunk) are checked against their
    Fletcher-32 checksum once, when the shard opens, and read from the map (page cache shared
    by every process), not copied per process."""

    def __init__(self, path: Path, variable_length: bool, dtype: str = "float16", recorded: np.ndarray | None = None):
        """`recorded`: this shard's rows' byte offsets from the cache's index/places.npy, if it has one."""
        self.file = _open_h5(path)
        self.dtype = np.dtype(dtype)  # what reads return (an int8 store's rows are dequantised to it)
        try:
            self._read_layout(path, variable_length, recorded)
        except BaseException:
            self.file.close()
            raise
        if self.places is not None:
            self.file.close()  # every row is read from the map from now on
            self.file = self.data = None

    def _read_layout(self, path: Path, variable_length: bool, recorded: np.ndarray | None) -> None:
        self.data = self.file.get("data")
        if self.data is not None and not isinstance(self.data, h5py.Dataset):
            raise ValueError("'data' is not a dataset")
        self.offsets = self.file["offsets"][:] if variable_length else None  # (N + 1,) row starts
        self.rows = 0 if self.data is None else len(self.offsets) - 1 if variable_length else self.data.shape[0]
        self.zero_fill = self.data is not None and not np.asarray(self.data.fillvalue).any()
        if recorded is not None and self.data is not None and self._recorded_here(recorded):
            # row -> why it cannot be used: rows places.npy records without a place (-1)
            self.damaged: dict[int, str] = dict.fromkeys(np.flatnonzero(recorded < 0).tolist(), NO_PLACE)
            self.places, self.recorded = int_items(recorded), True  # recorded: its places are places.npy's
        else:
            self._walk_chunk_index(path.stat().st_size, variable_length)
            self.recorded = False
        self.map = _map_file(path) if self.places is not None else None
        self.scale = self._read_scales(path.stat().st_size) if self.data is not None else None
        self.row_bytes = self.data.dtype.itemsize * int(np.prod(self.data.shape[1:])) if self.data is not None else 0
        self.checksummed = self.data is not None and self.data.fletcher32
        # bit r: row r is read from the map (checked, or a shard without checksums); damaged rows never are
        self.checked = bytearray((self.rows + 7) // 8)
        if self.places is not None and not self.checksummed:
            self.checked = bytearray(b"\xff" * len(self.checked))
            for r in self.damaged:
                self.checked[r >> 3] &= ~(1 << (r & 7)) & 0xFF
        # a trainer's prefetch thread and its main thread may both read rows first: setting a bit
        # rewrites a byte that 8 rows share, so two threads at once could lose one
        self.lock = threading.Lock()
        # the row at byte offset `start` of the map: np.ndarray(shape, dtype, map, start)
        self.view = functools.partial(np.ndarray, self.data.shape[1:], self.data.dtype, self.map) \
            if self.map is not None else None

    def _walk_chunk_index(self, file_size: int, variable_length: bool) -> None:
        """Every row's place and damage from the shard's chunk index: 2.5-4.4 us a row, in this process."""
        layout = chunk_layout(self.data, file_size) if self.data is not None else None
        # row -> why it cannot be used (its chunk is missing from the index, or lies outside the file)
        self.damaged = layout.damaged_rows(self.offsets) if layout is not None else {}
        self.places = layout.row_places() if layout is not None and not variable_length else None

    def _recorded_here(self, recorded: np.ndarray) -> bool:
        """Whether places.npy's offsets are this file's: as many as its rows, raw one-row chunks,
        and row 0's chunk where they say, of a raw chunk's size. A shard replaced after they were
        written (rewritten, repacked) is walked instead. Only row 0: HDF5 finds a chunk by its
        coordinates by walking the chunk index up to it (the last row of a 10^5-row shard: 10 ms);
        a row elsewhere is still checked against its checksum where it is read."""
        if len(recorded) != self.rows or not _mapped_layout(self.data):
            return False
        if not self.rows or recorded[0] < 0:
            return True
        info = self.data.id.get_chunk_info_by_coord((0,) * self.data.ndim)
        return info.byte_offset == recorded[0] and not info.filter_mask and info.size == _raw_chunk_size(self.data)

    def _read_scales(self, file_size: int) -> np.ndarray | None:
        """An int8 store's row scales, checked: a view of the map where the chunk is raw in it,
        else read through HDF5 (which checks their Fletcher-32 itself)."""
        if self.data.dtype != np.int8:
            return None
        scale = self.file.get("scale")
        if not isinstance(scale, h5py.Dataset) or scale.shape != (self.rows,):
            raise ValueError("its int8 rows lack their 'scale' dataset (one scale per row)")
        if self.map is None or not scale.fletcher32 or scale.chunks != scale.shape:
            return scale[:]
        info = scale.id.get_chunk_info(0)
        if info.byte_offset is None or not 0 < info.byte_offset <= file_size - info.size:
            raise ValueError("its row scales' chunk is missing from the shard or lies outside it")
        if info.filter_mask or info.size != scale.nbytes + 4:
            return scale[:]
        start = info.byte_offset
        stored = int.from_bytes(self.map[start + scale.nbytes:start + info.size], "little")
        if stored not in fletcher32_values(np.ndarray(scale.nbytes, np.uint8, self.map, start)):
            raise ValueError("its row scales do not match their Fletcher-32 checksum")
        return np.ndarray(scale.shape, scale.dtype, self.map, start)

    def row_at(self, start: int, r: int) -> np.ndarray:
        """Row r, checked, from byte `start` of the map (start(r)): a new array in the cache's dtype."""
        return self._decoded(self.view(start), r, copy=True)

    def _decoded(self, row: np.ndarray, r: int, copy: bool = False) -> np.ndarray:
        if self.scale is None:
            return row.copy() if copy else row
        return dequantise(row, self.scale[r], self.dtype)

    def start(self, r: int, recorded: int = -1) -> int:
        """Row r's byte offset in the memory map, or -1: read it through read() (to be checked, or
        not mapped). `recorded`: its offset in places.npy where the caller has it already (taken
        only if this shard reads its places from there)."""
        if self.checked[r >> 3] >> (r & 7) & 1:
            return recorded if recorded >= 0 and self.recorded else self.places[r]
        return -1

    def read(self, r: int) -> np.ndarray:
        """A row not read from the map yet: checked against its checksum (where it has one),
        and read from the map from then on; rows of other layouts through HDF5."""
        if r in self.damaged:
            raise DamagedRow(self.damaged[r])
        if self.places is not None:
            return self._check(r)
        first, stop = (int(self.offsets[r]), int(self.offsets[r + 1])) if self.offsets is not None else (r, r + 1)
        row = self.data[first:stop] if self.offsets is not None else self.data[r]
        if not self._written(row) and self._chunk_absent(first, stop):
            raise DamagedRow(FILL_VALUE_READ)
        return self._decoded(row, r)

    def _check(self, r: int) -> np.ndarray:
        start = self.places[r]
        if start < 0:  # no chunk: the layout check flags such rows as damaged, this is its backstop
            raise DamagedRow(FILL_VALUE_READ)
        with self.lock:
            row = self.view(start).copy()
            if self.checksummed and not self.checked[r >> 3] >> (r & 7) & 1:
                stored = int.from_bytes(self.map[start + self.row_bytes:start + self.row_bytes + 4], "little")
                if stored not in fletcher32_values(row.reshape(-1).view(np.uint8)):
                    raise DamagedRow("its bytes do not match their Fletcher-32 checksum")
            self.checked[r >> 3] |= 1 << (r & 7)
        return self._decoded(row, r)

    def _written(self, row: np.ndarray) -> bool:
        """Whether a row holds anything but the fill value (zeros): only a row read as all
        zeros costs a look at the chunk index (a row written as zeros has its chunk, and reads).
        Its bytes are tested, as 8-byte words: comparing float16 values costs 10x more."""
        if row.size == 0 or not self.zero_fill:  # a fill value blitext does not write: untested
            return True
        flat = row.reshape(-1).view(np.uint8)
        return bool((flat.view(np.uint64) if flat.size % 8 == 0 else flat).any())

    def _chunk_absent(self, first: int, stop: int) -> bool:
        per = self.data.chunks[0]
        for start in range(first - first % per, stop, per):
            if self.data.id.get_chunk_info_by_coord((start, *[0] * (self.data.ndim - 1))).byte_offset is None:
                return True
        return False

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
        if self.file is not None:
            self.file.close()


FILL_VALUE_READ = "reads as the fill value: its chunk is missing from the shard's chunk index"
NO_PLACE = "its chunk was missing from the shard's chunk index, or lay outside the file, when the cache was finished"


class DamagedRow(ValueError):
    """A row the shard's chunk index does not hold where the layout written puts it."""


FLETCHER_BLOCK = 1 << 16  # 16-bit words summed at once: their weighted sums stay far inside int64
_RAMP = np.arange(FLETCHER_BLOCK, dtype=np.int64)  # 512 KB, once per process


def fletcher32_values(data: np.ndarray) -> tuple[int, int]:
    """The Fletcher-32 checksum HDF5 computes of `data` (uint8), and its byte-swapped form, which
    HDF5 also accepts (files written before HDF5 1.6.3 on little-endian machines).

    HDF5 (H5_checksum_fletcher32) sums big-endian 16-bit words w_0..w_(n-1): sum1 = sum of
    w_i, sum2 = sum of the running sum1 = sum of (n - i) w_i, folding both to 16 bits as it
    goes. A fold keeps a sum's value modulo 65535 and keeps it above zero, so each result is 0
    when every byte is 0 and otherwise the whole sum modulo 65535 written in 1..65535: computed
    here from whole sums, with numpy (a Python loop over words would cost 1,000x more)."""
    words = data[:data.size - data.size % 2].view(">u2")
    n, s1, s2 = len(words), 0, 0
    for at in range(0, n, FLETCHER_BLOCK):
        block = words[at:at + FLETCHER_BLOCK].astype(np.int64)
        total = int(block.sum())
        s2 += (n - at) * total - int(np.dot(block, _RAMP[:len(block)]))
        s1 += total
    if data.size % 2:
        s1 += int(data[-1]) << 8
        s2 += s1
    value = _fold(s2) << 16 | _fold(s1)
    return value, (value & 0x00FF00FF) << 8 | (value >> 8) & 0x00FF00FF


def _fold(total: int) -> int:
    return 0 if total == 0 else (total - 1) % 65535 + 1


def _open_h5(path: Path) -> h5py.File:
    """A shard opened with HDF5's metadata cache bounded (METADATA_CACHE_BYTES)."""
    file = h5py.File(path, "r")
    config = file.id.get_mdc_config()
    config.set_initial_size = True
    config.initial_size = config.max_size = METADATA_CACHE_BYTES
    config.min_size = min(config.min_size, METADATA_CACHE_BYTES)
    config.max_increment = min(config.max_increment, METADATA_CACHE_BYTES)
    file.id.set_mdc_config(config)
    return file


def _map_file(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class ChunkLayout:
    """Where the shard's chunk index puts each chunk of `data` along its rows (blitext writes
    chunks that span whole rows: one row each, or 32 tokens of variable-length rows)."""

    def __init__(self, data: h5py.Dataset, file_size: int):
        self.per = data.chunks[0]  # rows (tokens) per chunk
        self.count = -(-data.shape[0] // self.per)
        self.address = np.full(self.count, -1, np.int64)  # byte offset of chunk i; -1: none usable
        self.why: dict[int, str] = {}  # chunk -> what is wrong with it
        self.raw = _raw_rows(data)  # one uncompressed row per chunk: a row is a slice of the file
        self.raw_size = _raw_chunk_size(data)
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
    with _open_h5(path) as file:
        data = file.get("data")
        if data is None:
            return np.zeros(0, np.int64)
        if not isinstance(data, h5py.Dataset) or not _mapped_layout(data):
            return None
        return ChunkLayout(data, path.stat().st_size).row_offsets()


def _whole_row_chunks(data: h5py.Dataset) -> bool:
    return data.chunks is not None and data.chunks[1:] == data.shape[1:]


def _mapped_layout(data: h5py.Dataset) -> bool:
    """Whether the dataset's rows can be read from the memory map: one per chunk, stored raw
    (a chunk's stored size is checked too, where the chunk index is read)."""
    return _whole_row_chunks(data) and _raw_rows(data)


def _raw_rows(data: h5py.Dataset) -> bool:
    if data.chunks[0] != 1:
        return False
    return not (data.compression or data.shuffle or data.scaleoffset is not None)  # Fletcher-32 keeps the bytes


def _raw_chunk_size(data: h5py.Dataset) -> int:
    """A chunk's bytes when HDF5 stored it unfiltered: its values, then its checksum if it has one."""
    return data.dtype.itemsize * int(np.prod(data.chunks)) + 4 * data.fletcher32


def int_items(array: np.ndarray) -> memoryview:
    """A 64-bit integer array as a flat memoryview whose items are Python ints: indexing it costs
    a fraction of numpy's per-call overhead on scalars, and a memory map stays a memory map."""
    return memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B").cast("Q" if array.dtype.kind == "u" else "q")
