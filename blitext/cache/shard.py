"""One shard of a cache, opened for reading in one process: where its rows are, which rows are
damaged, which this process has checked, and the memory map the rows are copied from.
FeatureCache (reader.py) opens one per shard on the shard's first read."""
from __future__ import annotations

import functools
import mmap
import threading
from pathlib import Path

import h5py
import numpy as np

from blitext.cache.chunks import chunk_layout, int_items, mapped_layout, open_h5, raw_chunk_size
from blitext.cache.quantise import dequantise


class Shard:
    """One open shard. Uncompressed one-row chunks sit at fixed byte offsets in the file, so
    once those are known a row is a plain slice of a memory map: h5py's per-read selection
    costs far more than copying a 100 KB row (bench/cache_read.py).

    A cache finished since index/places.npy exists (keyindex.py) lists every row's offset there,
    found by one pass over each shard's HDF5 chunk index when the cache was finished: the shard
    takes its slice of that map, checks that its first row's chunk is where it says (a shard
    replaced since is walked as below), and holds no offsets of its own. Rows the pass found
    damaged are -1 there, and refused when read.

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
        self.file = open_h5(path)
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
        if len(recorded) != self.rows or not mapped_layout(self.data):
            return False
        if not self.rows or recorded[0] < 0:
            return True
        info = self.data.id.get_chunk_info_by_coord((0,) * self.data.ndim)
        return info.byte_offset == recorded[0] and not info.filter_mask and info.size == raw_chunk_size(self.data)

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


def _map_file(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
