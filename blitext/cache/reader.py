"""Reading a finished cache: random access by key, batches, and a torch Dataset.

HDF5 files are opened lazily in the process that reads them (a handle opened before a
DataLoader fork is not safe to share), so a FeatureCache can be handed to workers as is.
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np
import torch

from blitext.cache.manifest import load_manifest, require_producer
from blitext.errors import BlitextError


class FeatureCache:
    """A finished cache: `cache[key]` -> np.ndarray row (fixed (T, D) or variable (T_i, D))."""

    def __init__(self, root: str | Path, expect: dict | None = None, fix: str = "re-run the command that made it"):
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        if expect:
            require_producer(self.producer, expect, self.root, fix)
        self.variable_length = bool(self.manifest["variable_length"])
        self.index: dict[str, tuple[int, int]] = {}
        for s, shard in enumerate(self.manifest["shards"]):
            for r, key in enumerate(shard["keys"]):
                self.index[key] = (s, r)
        self._files: dict[int, h5py.File] = {}
        self._pid = None

    # ------------------------------------------------------------ metadata
    @property
    def producer(self) -> dict:
        return self.manifest["producer"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def keys(self) -> list[str]:
        return list(self.index)

    @property
    def row_shape(self) -> list:
        return self.manifest["row_shape"]

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    # ------------------------------------------------------------ reading
    def _shard(self, shard: int) -> "_Shard":
        if self._pid != os.getpid():  # forked into a worker: the parent's handles are not ours
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            path = self.root / self.manifest["shards"][shard]["file"]
            try:
                self._files[shard] = _Shard(path, self.variable_length)
            except OSError as e:
                raise BlitextError(f"cannot open cache shard {path}: {e}; run `blitext cache verify {self.root}`") from None
        return self._files[shard]

    def _locate(self, key: str) -> tuple[int, int]:
        try:
            return self.index[key]
        except KeyError:
            raise BlitextError(f"key {key!r} is not in the cache {self.root} ({len(self)} rows)") from None

    def __getitem__(self, key: str) -> np.ndarray:
        shard, row = self._locate(key)
        return self._shard(shard).row(row)

    def get_many(self, keys: Sequence[str]) -> list[np.ndarray]:
        return [self[k] for k in keys]

    def get_batch(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stacked rows (B, T, D); for variable rows zero-padded, with a (B, T) bool mask."""
        return collate_rows(self.get_many(keys), self.variable_length)

    def dataset(self, keys: Iterable[str] | None = None) -> "CacheDataset":
        return CacheDataset(self, list(keys) if keys is not None else self.keys)

    def close(self) -> None:
        for shard in self._files.values():
            shard.close()
        self._files = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, None  # handles never travel to other processes
        return state


class _Shard:
    """One open shard. Uncompressed one-row chunks sit at fixed byte offsets in the file, so
    after one pass over HDF5's chunk index a row is a plain slice of a memory map: h5py's
    per-read selection costs far more than copying a 100 KB row (bench/cache_read.py)."""

    def __init__(self, path: Path, variable_length: bool):
        self.file = h5py.File(path, "r")
        self.data = self.file["data"] if "data" in self.file else None
        self.offsets = self.file["offsets"][:] if variable_length else None  # (N + 1,) row starts
        self.starts = _chunk_starts(self.data) if self.data is not None and not variable_length else None
        self.map = _map_file(path) if self.starts is not None else None
        if self.data is not None:  # h5py attribute lookups are slow: read them once
            self.shape, self.dtype = self.data.shape[1:], self.data.dtype
            self.count = int(np.prod(self.shape))

    def row(self, r: int) -> np.ndarray:
        if self.starts is not None:
            row = np.frombuffer(self.map, self.dtype, self.count, int(self.starts[r]))
            return row.reshape(self.shape).copy()
        if self.offsets is not None:
            return self.data[self.offsets[r]:self.offsets[r + 1]]
        return self.data[r]

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
        self.file.close()


def _map_file(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _chunk_starts(data: h5py.Dataset) -> np.ndarray | None:
    """Byte offset of each row's chunk, or None when rows are not stored raw one per chunk."""
    if data.chunks is None or data.chunks[0] != 1 or data.chunks[1:] != data.shape[1:] or data.compression:
        return None
    starts = np.full(data.shape[0], -1, dtype=np.int64)

    def record(info) -> None:
        if info.filter_mask == 0:
            starts[info.chunk_offset[0]] = info.byte_offset

    data.id.chunk_iter(record)
    return starts if (starts >= 0).all() else None


def collate_rows(rows: Sequence[np.ndarray], variable_length: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not variable_length:
        return torch.from_numpy(np.stack(rows)), None
    longest = max(len(r) for r in rows)
    out = np.zeros((len(rows), longest, *rows[0].shape[1:]), dtype=rows[0].dtype)
    mask = np.zeros((len(rows), longest), dtype=bool)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
        mask[i, :len(r)] = True
    return torch.from_numpy(out), torch.from_numpy(mask)


class CacheDataset(torch.utils.data.Dataset):
    """(key, tensor) pairs; safe with DataLoader workers (files open lazily per process)."""

    def __init__(self, cache: FeatureCache, keys: list[str]):
        self.cache, self.keys = cache, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor]:
        key = self.keys[i]
        return key, torch.from_numpy(np.array(self.cache[key]))
