"""Reading a finished cache: random access by key, batches, and a torch Dataset.

HDF5 files are opened lazily in the process that reads them (a handle opened before a
DataLoader fork is not safe to share), so a FeatureCache can be handed to workers as is.
"""
from __future__ import annotations

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
    def _file(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():  # forked into a worker: the parent's handles are not ours
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            path = self.root / self.manifest["shards"][shard]["file"]
            try:
                self._files[shard] = h5py.File(path, "r")
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
        f = self._file(shard)
        if self.variable_length:
            start, stop = f["offsets"][row:row + 2]
            return f["data"][start:stop]
        return _read_row(f["data"], row)

    def get_many(self, keys: Sequence[str]) -> list[np.ndarray]:
        return [self[k] for k in keys]

    def get_batch(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stacked rows (B, T, D); for variable rows zero-padded, with a (B, T) bool mask."""
        return collate_rows(self.get_many(keys), self.variable_length)

    def dataset(self, keys: Iterable[str] | None = None) -> "CacheDataset":
        return CacheDataset(self, list(keys) if keys is not None else self.keys)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, None  # handles never travel to other processes
        return state


def _read_row(data: h5py.Dataset, row: int) -> np.ndarray:
    """One row. Uncompressed one-row chunks are read directly: h5py's hyperslab selection
    costs more than reading a 100 KB row (bench/cache_read.py measures it)."""
    if data.chunks is not None and data.chunks[0] == 1 and data.compression is None:
        mask, raw = data.id.read_direct_chunk((row,) + (0,) * (data.ndim - 1))
        if mask == 0:
            return np.frombuffer(raw, dtype=data.dtype).reshape(data.shape[1:])
    return data[row]


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
