"""Reading a finished cache: random access by key, batches, and a torch Dataset.

HDF5 files are opened lazily in the process that reads them (a handle opened before a
DataLoader fork is not safe to share), so a FeatureCache can be handed to workers as is.

Rows are checked on read: a shard whose size differs from the manifest's, whose HDF5
metadata is damaged, a row whose chunk the shard's chunk index lost or moved (HDF5 would read
it as zeros), or a row whose Fletcher-32 checksum fails is one BlitextError line naming the
shard (and row), never a traceback or silently wrong numbers.

Keys are found through the cache's memory-mapped key index (keyindex.py): opening a cache
reads its manifest (a summary per shard) and maps three files, whatever the number of rows.

torch is imported only by what returns tensors (get_batch, collate_rows, CacheDataset's items):
a process that only reads rows as numpy (an inspection tool, a data pipeline) stays about
200 MB smaller without it.
"""
from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from blitext.cache.chunks import H5_ERRORS
from blitext.cache.keyindex import KeyIndex, load_places, open_index
from blitext.cache.manifest import FEATURE_KINDS, load_manifest, require_kind, require_producer, sidecar_name
from blitext.cache.shard import DamagedRow, Shard
from blitext.errors import BlitextError, first_line

if TYPE_CHECKING:
    import torch

_open_caches: "weakref.WeakSet[FeatureCache]" = weakref.WeakSet()


def _forget_handles_after_fork() -> None:
    for cache in list(_open_caches):
        cache._forget_handles()


# A forked DataLoader worker must not use the parent's HDF5 handles; resetting them once at the
# fork keeps a check out of every read (os.getpid() per read is a system call).
os.register_at_fork(after_in_child=_forget_handles_after_fork)


class FeatureCache:
    """A finished cache: `cache[key]` -> np.ndarray row (fixed (T, D) or variable (T_i, D))."""

    def __init__(self, root: str | Path, expect: dict | None = None, fix: str = "re-run the command that made it",
                 kinds: tuple[str, ...] | None = FEATURE_KINDS):
        """`kinds`: the cache kinds this reader accepts (feature caches by default; None: any)."""
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        if kinds is not None:
            require_kind(self.root, self.kind, kinds)
        if expect:
            require_producer(self.producer, expect, self.root, fix)
        self.variable_length = bool(self.manifest["variable_length"])
        self.index, self.manifest = open_index(self.root, self.manifest)
        self._forget_handles()
        _open_caches.add(self)

    # ------------------------------------------------------------ metadata
    @property
    def producer(self) -> dict:
        return self.manifest["producer"]

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "?")

    @property
    def keys(self) -> KeyIndex:
        """Every key in row order: a read-only sequence backed by the memory-mapped index."""
        return self.index

    @property
    def row_shape(self) -> list:
        return self.manifest["row_shape"]

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def locate(self, key: str) -> tuple[int, int]:
        """(shard, row) of `key`."""
        g = self.index.locate(key)
        if g < 0:
            raise BlitextError(f"key {key!r} is not in the cache {self.root} ({len(self)} rows)")
        return self.index.shard_row(g)

    # ------------------------------------------------------------ reading
    def _forget_handles(self) -> None:
        """Shards open on first read; never closed here (after a fork they are the parent's).
        Nothing per row until a shard is opened, so opening a cache is O(shards): places.npy,
        where the cache has one, is mapped, not read."""
        self._files: list[Shard | None] = [None] * len(self.manifest["shards"])
        self._places = load_places(self.root, self.manifest)

    def _shard(self, shard: int) -> "Shard":
        reader = self._files[shard]
        if reader is None:
            reader = self._open(shard)
            rows = self.manifest["shards"][shard]["rows"]
            if reader.rows != rows:
                reader.close()
                # its size matched the manifest's: the bytes are there, the HDF5 metadata naming them is not
                raise self._damaged(shard, f"has damaged metadata: it holds {reader.rows} rows, "
                                           f"the manifest says {rows}")
            self._files[shard] = reader
        return reader

    def _open(self, shard: int) -> "Shard":
        entry = self.manifest["shards"][shard]
        path = self.root / entry["file"]
        try:
            size = path.stat().st_size
        except OSError as e:
            raise self._damaged(shard, f"cannot be opened ({e.strerror})") from None
        if size != entry["bytes"]:
            raise self._damaged(shard, f"is {size:,} bytes, the manifest says {entry['bytes']:,} (truncated or replaced)")
        try:
            return Shard(path, self.variable_length, self.manifest["dtype"], self._recorded_places(shard))
        except H5_ERRORS as e:
            raise self._damaged(shard, f"does not open as a cache shard ({first_line(e)})") from None

    def _recorded_places(self, shard: int) -> np.ndarray | None:
        """The shard's rows' slice of places.npy (still mapped), or None."""
        if self._places is None:
            return None
        start = self.index.shard_starts[shard]
        return self._places[start:start + self.manifest["shards"][shard]["rows"]]

    def _damaged(self, shard: int, what: str) -> BlitextError:
        """One line: which shard (and row) is damaged, how to confirm it and how to rebuild it."""
        name = self.manifest["shards"][shard]["file"]
        return BlitextError(
            f"cache shard {self.root / name} {what}; run `blitext cache verify {self.root}`, then rebuild it: "
            f"delete {name} and {sidecar_name(shard)} there and run the command that made the cache again "
            f"(it redoes only the missing shards)")

    def __getitem__(self, key: str) -> np.ndarray:
        return self._row(key, *self.locate(key))

    def _row(self, key: str, shard: int, row: int, recorded: int = -1) -> np.ndarray:
        """`recorded`: the row's offset in places.npy, where get_many gathered it (Shard.start)."""
        reader = self._files[shard]
        if reader is not None:
            start = reader.start(row, recorded)
            if start >= 0:  # the hot path: a checked row, copied out of the memory map
                return reader.row_at(start, row)
        try:
            return self._shard(shard).read(row)
        except DamagedRow as e:
            raise self._damaged(shard, f"row {row} (key {key!r}) is damaged: {e}") from None
        except H5_ERRORS as e:
            raise self._damaged(shard, f"row {row} (key {key!r}) fails its check ({first_line(e)})") from None

    def get_many(self, keys: Sequence[str]) -> list[np.ndarray]:
        """The rows of `keys`, as cache[key] gives each: the keys found together (KeyIndex.locate_many),
        their places in the shards too where places.npy has them (one gather: the far reads in
        flight together, as locate_many's), then each row copied from its memory map."""
        found = self.index.locate_many(keys)
        if len(found) and found.min() < 0:
            self.locate(keys[int(np.argmin(found))])  # raises: names the missing key
        shards, rows = self.index.shard_row_many(found)
        recorded = np.take(self._places, found).tolist() if self._places is not None else [-1] * len(found)
        return [self._row(*args) for args in zip(keys, shards.tolist(), rows.tolist(), recorded)]

    def get_batch(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stacked rows (B, T, D); for variable rows zero-padded, with a (B, T) bool mask."""
        return collate_rows(self.get_many(keys), self.variable_length)

    def dataset(self, keys: Iterable[str] | None = None) -> "CacheDataset":
        return CacheDataset(self, list(keys) if keys is not None else self.keys)

    def close(self) -> None:
        for shard in filter(None, self._files):
            shard.close()
        self._forget_handles()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_files"], state["_places"]  # handles and maps never travel to other processes
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._forget_handles()
        _open_caches.add(self)


def collate_rows(rows: Sequence[np.ndarray], variable_length: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    import torch  # here, not at the top: reading rows as numpy needs no torch (module docstring)

    if not variable_length:
        return torch.from_numpy(np.stack(rows)), None
    longest = max(len(r) for r in rows)
    out = np.zeros((len(rows), longest, *rows[0].shape[1:]), dtype=rows[0].dtype)
    mask = np.zeros((len(rows), longest), dtype=bool)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
        mask[i, :len(r)] = True
    return torch.from_numpy(out), torch.from_numpy(mask)


class CacheDataset:
    """(key, tensor) pairs; safe with DataLoader workers (files open lazily per process). A map-style
    dataset as DataLoader takes one (__len__, __getitem__): subclassing torch's Dataset would
    import torch with the cache."""

    def __init__(self, cache: FeatureCache, keys: list[str]):
        self.cache, self.keys = cache, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor]:
        import torch  # here, not at the top: reading rows as numpy needs no torch (module docstring)

        key = self.keys[i]
        return key, torch.from_numpy(np.array(self.cache[key]))

    def __getitems__(self, indices: list[int]) -> list[tuple[str, torch.Tensor]]:
        """A DataLoader batch's items (DataLoader calls this where a dataset has it): their keys
        found together (FeatureCache.get_many)."""
        import torch

        keys = [self.keys[i] for i in indices]
        return [(key, torch.from_numpy(row)) for key, row in zip(keys, self.cache.get_many(keys))]
