"""Read-only string columns held compactly, for the millions of captions read_pairs keeps.

A Python list of str costs a 49-byte object and an 8-byte pointer per string besides its text
(about 1 KB per caption with the dict and records around them, 139 GB at 129M captions). Here a
column is one UTF-8 blob and int64 offsets; a string is decoded when it is asked for. The
columns behave as sequences (len, index, slice, iteration, == a list), so callers that took
lists keep working.
"""
from __future__ import annotations

import operator
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from blitext.data.records import caption_key

_CHUNK = 65_536  # strings decoded per step when iterating or reordering: bounded temporary lists


def _position(i, length: int) -> int:
    i = operator.index(i)
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"index {i} out of range for a column of {length}")
    return i


class _Column(Sequence):
    """Sequence behaviour shared by the columns: slices give lists, == compares with any sequence."""

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(len(self)))]
        return self._get(_position(i, len(self)))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} strings)"


class StringColumn(_Column):
    """Strings as one UTF-8 blob: string i is blob[offsets[i]:offsets[i + 1]]."""

    def __init__(self, blob: bytes | bytearray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _get(self, i: int) -> str:
        return self.blob[self.offsets[i]:self.offsets[i + 1]].decode()

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), _CHUNK):
            bounds = self.offsets[start:start + _CHUNK + 1].tolist()
            for a, b in zip(bounds, bounds[1:]):
                yield self.blob[a:b].decode()

    @property
    def nbytes(self) -> int:
        return len(self.blob) + self.offsets.nbytes

    def reordered(self, order: np.ndarray) -> StringColumn:
        """The strings in `order`; copied a chunk at a time, never one object per string at once."""
        starts, ends = self.offsets[:-1][order], self.offsets[1:][order]
        offsets = np.zeros(len(order) + 1, np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        blob, view = bytearray(), memoryview(self.blob)
        for c in range(0, len(order), _CHUNK):
            blob += b"".join(view[a:b] for a, b in zip(starts[c:c + _CHUNK].tolist(), ends[c:c + _CHUNK].tolist()))
        view.release()
        return StringColumn(blob, offsets)


class StringBuilder:
    """Appends strings to a blob and its offsets; `column()` hands them over without a copy."""

    def __init__(self):
        self.blob, self.offsets = bytearray(), array("q", [0])

    def append(self, text: str) -> None:
        self.blob += text.encode()
        self.offsets.append(len(self.blob))

    def __getitem__(self, i: int) -> str:
        return self.blob[self.offsets[i]:self.offsets[i + 1]].decode()

    def column(self) -> StringColumn:
        return StringColumn(self.blob, _numpy(self.offsets))


def _numpy(values: array) -> np.ndarray:
    """An array.array's items as a read-only numpy array over the same memory."""
    out = np.frombuffer(values, dtype=np.dtype(values.typecode))  # numpy reads array's type codes alike
    out.flags.writeable = False
    return out


class GatherColumn(_Column):
    """values[index[i]]: one string per row from a column of unique values (an image id per caption)."""

    def __init__(self, values: StringColumn, index: np.ndarray):
        self.values, self.index = values, index

    def __len__(self) -> int:
        return len(self.index)

    def _get(self, i: int) -> str:
        return self.values[int(self.index[i])]

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), _CHUNK):
            yield from (self.values._get(j) for j in self.index[start:start + _CHUNK].tolist())

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.index.nbytes


class KeyColumn(_Column):
    """caption_key(image_ids[i], k[i]), built when asked for: the prompt cache's key of each caption."""

    def __init__(self, image_ids: Sequence[str], k: np.ndarray):
        self.image_ids, self.k = image_ids, k

    def __len__(self) -> int:
        return len(self.k)

    def _get(self, i: int) -> str:
        return caption_key(self.image_ids[i], int(self.k[i]))

    def __iter__(self) -> Iterator[str]:
        image_ids = iter(self.image_ids)
        for start in range(0, len(self), _CHUNK):
            for k in self.k[start:start + _CHUNK].tolist():
                yield caption_key(next(image_ids), k)


class ImageRefs(Mapping):
    """image id -> (root, reference) of the images that have pairs, for --online. Looked up
    through crc32 hashes sorted once on first use (4 + 4 bytes per image, not a dict's ~150):
    only --online asks. An id in two caption files maps to the later file's image, as a dict
    filled file by file did."""

    def __init__(self, ids: StringColumn, refs: StringColumn, image_index: np.ndarray,
                 roots: list[Path], file_starts: list[int]):
        self.ids, self.refs, self.image_index = ids, refs, image_index
        self.roots, self.file_starts = roots, file_starts
        self._hashes: np.ndarray | None = None
        self._order: np.ndarray | None = None

    def _with_pairs(self) -> np.ndarray:
        return np.flatnonzero(np.bincount(self.image_index, minlength=len(self.ids))).astype(np.int32)

    def _sort(self) -> None:
        numbers = self._with_pairs()
        hashes = np.fromiter((zlib.crc32(self.ids._get(i).encode()) for i in numbers.tolist()), np.uint32, len(numbers))
        order = np.lexsort((numbers, hashes))  # by hash, then image number: the later file's last
        self._order, self._hashes = numbers[order], hashes[order]  # set last: a reader sees both or neither

    def _find(self, image_id: str) -> int | None:
        if self._hashes is None:
            self._sort()
        h = zlib.crc32(image_id.encode())
        lo, hi = np.searchsorted(self._hashes, h, "left"), np.searchsorted(self._hashes, h, "right")
        return next((i for i in reversed(self._order[lo:hi].tolist()) if self.ids._get(i) == image_id), None)

    def __getitem__(self, image_id: str) -> tuple[Path, str]:
        i = self._find(image_id) if isinstance(image_id, str) else None
        if i is None:
            raise KeyError(image_id)
        return self.roots[bisect_right(self.file_starts, i) - 1], self.refs._get(i)

    def __iter__(self) -> Iterator[str]:
        return (self.ids._get(i) for i in self._with_pairs().tolist())

    def __len__(self) -> int:
        return len(self._with_pairs())

    @property
    def nbytes(self) -> int:
        return self.refs.nbytes + sum(a.nbytes for a in (self._hashes, self._order) if a is not None)
