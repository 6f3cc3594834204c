"""Writing a sharded HDF5 cache so that a killed job loses at most one shard.

Items are planned up front in a fixed order and cut into shards of `shard_size`; shard i
belongs to rank i % world. A shard is written to a temp file, flushed, fsynced and renamed,
then its JSON sidecar (keys, failures, checksum) is written the same way: a shard counts as
done only when both exist, so a resume redoes exactly the unfinished ones.

Rows carry HDF5's Fletcher-32 checksum (one per chunk, and a fixed row is one chunk), which
readers check. An int8 store (quantise.py) writes the rows as int8 and their scales as one more
dataset, `scale` (N,) float32, one chunk with its own Fletcher-32 checksum. A full disk or an
unwritable folder is one BlitextError line naming the cache folder; the temp shard is removed,
and the same command resumes once the fault is fixed.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from blitext.atomic import publish, read_json, sha256_file, write_json, write_failure, writing
from blitext.cache.keyindex import placed_shards, write_index
from blitext.cache.manifest import FORMAT, MANIFEST, RUN, normalised, require_producer, shard_name, sidecar_name
from blitext.cache.quantise import INT8, SCALE_DTYPE, quantise, store_name, stored_dtype
from blitext.errors import BlitextError

VARIABLE_CHUNK_ROWS = 32  # variable-length rows: chunks of 32 tokens (a row is a slice of a flat array)
ROW_CHECKSUM = "fletcher32"  # recorded per shard; shards written before it have none (still readable)


def plan_digest(keys: Sequence[str]) -> str:
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class CachePlan:
    """What a cache will hold: the ordered keys, how they are sharded, and who makes them."""

    root: Path
    kind: str                       # "image-features", "video-features", "prompts", ...
    producer: dict                  # model fingerprints + preprocessing: must match to resume or read
    keys: list[str]
    shard_size: int
    dtype: str = "float16"          # what readers get back
    store: str | None = None        # what the shards hold when not `dtype`: "int8" (a float32 scale per row)
    variable_length: bool = False   # rows of shape (T_i, D) with T_i varying (e.g. video segments)
    provenance: dict = field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        return max(1, -(-len(self.keys) // self.shard_size))

    def __post_init__(self) -> None:
        if self.store not in (None, self.dtype, INT8):
            raise BlitextError(f"store {self.store!r}: expected int8, or none (rows stored as {self.dtype})")
        if self.quantised and self.variable_length:
            raise BlitextError("an int8 store holds fixed rows only: store variable-length rows as "
                               f"{self.dtype} (leave --store out)")

    @property
    def stored(self) -> str:
        """The dtype of the values in the shards."""
        return self.store or self.dtype

    @property
    def quantised(self) -> bool:
        return self.stored == INT8

    def shard_range(self, index: int) -> range:
        return range(index * self.shard_size, min((index + 1) * self.shard_size, len(self.keys)))

    def run_record(self) -> dict:
        return {
            "format": FORMAT, "kind": self.kind, "producer": self.producer, "dtype": self.dtype, "store": self.stored,
            "variable_length": self.variable_length, "shard_size": self.shard_size,
            "num_items": len(self.keys), "plan_sha256": plan_digest(self.keys), "provenance": self.provenance,
        }


def start_or_resume(plan: CachePlan, write: bool = True) -> None:
    """Create the cache folder and run.json, or check that an existing one is the same job.

    Only rank 0 writes (`write=True`); the other ranks check after a barrier.
    """
    run_file = plan.root / RUN
    if run_file.is_file():
        found = read_json(run_file)
        fix = f"use another --out, or delete {plan.root} to start over"
        require_producer(found.get("producer", {}), plan.producer, plan.root, fix)
        require_store(found, plan)
        for key in ("kind", "dtype", "variable_length", "shard_size", "plan_sha256"):
            if normalised(found.get(key)) != normalised(plan.run_record()[key]):
                raise BlitextError(
                    f"{plan.root} was started with a different {key.replace('_', ' ')} "
                    f"({found.get(key)!r} vs {plan.run_record()[key]!r}): {fix}"
                )
        return
    if not write:
        raise BlitextError(f"{run_file} is missing (rank 0 should have written it)")
    if plan.root.exists() and (not plan.root.is_dir() or any(plan.root.iterdir())):
        raise BlitextError(f"{plan.root} exists and is not a blitext cache: choose an empty or new --out")
    with writing(plan.root):
        plan.root.mkdir(parents=True, exist_ok=True)
        write_json(run_file, plan.run_record())


def require_store(found: dict, plan: CachePlan) -> None:
    """Refuse to mix stores in one cache (run.json written before stores had one: stored as dtype)."""
    was = stored_dtype(found)
    if was != plan.stored:
        raise BlitextError(
            f"{plan.root} was started with --store {store_name(was)} ({was} rows); this run asks for --store "
            f"{store_name(plan.stored)}: resume it with --store {store_name(was)}, or write the "
            f"{store_name(plan.stored)} cache to another --out")


def shard_done(plan: CachePlan, index: int) -> bool:
    sidecar = plan.root / sidecar_name(index)
    shard = plan.root / shard_name(index)
    if not (sidecar.is_file() and shard.is_file()):
        return False
    try:
        return read_json(sidecar).get("bytes") == shard.stat().st_size
    except (OSError, ValueError):
        return False


def pending_shards(plan: CachePlan, rank: int = 0, world: int = 1) -> list[int]:
    """This rank's shards that are not finished; removes the temp files a killed run left."""
    pending = []
    with writing(plan.root):
        for i in range(rank, plan.num_shards, world):
            for stale in plan.root.glob(f".{shard_name(i)}.tmp*"):
                stale.unlink(missing_ok=True)
            if not shard_done(plan, i):
                pending.append(i)
    return pending


class _Sink:
    """The temp shard as HDF5 writes it, through h5py's file-object driver.

    HDF5 cannot recover from a failed write: after a full disk, closing the file crashed the
    process (exit 139). So HDF5 never sees one: the first OSError is kept, later I/O is
    skipped as if done, and the ShardWriter raises the kept error once HDF5 let go of the file.
    """

    def __init__(self, path: Path):
        self.file = open(path, "w+b")
        self.error: OSError | None = None
        self.pos = self.end = 0  # tracked for HDF5 once the file is no longer written

    def _do(self, op, *args, fallback=None):
        if self.error is None:
            try:
                return op(*args)
            except OSError as e:
                self.error = e
        return fallback

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = self.end if whence == os.SEEK_END else pos
        return self._do(self.file.seek, pos, whence, fallback=self.pos)

    def tell(self) -> int:
        return self._do(self.file.tell, fallback=self.pos)

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        self._do(self.file.write, data)
        self.pos += size
        self.end = max(self.end, self.pos)
        return size

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        got = self._do(self.file.readinto, view, fallback=0) or 0
        view[got:] = bytes(len(view) - got)
        self.pos += len(view)
        return len(view)

    def read(self, size: int = -1) -> bytes:  # h5py takes an object with read and seek as a file
        buf = bytearray(max(0, size))
        return bytes(buf[:self.readinto(buf)])

    def truncate(self, size: int | None = None) -> int:
        return self._do(self.file.truncate, size, fallback=size)

    def flush(self) -> None:
        self._do(self.file.flush)

    def close(self) -> None:
        self._do(self.file.close)  # flushes: the last buffered bytes can meet a full disk too
        with suppress(OSError):
            self.file.close()  # after an error: the unwritten buffer is dropped, the file closed


class ShardWriter:
    """Writes one shard; rows are added in order, failures recorded. Use as a context manager."""

    def __init__(self, plan: CachePlan, index: int):
        self.plan, self.index = plan, index
        self.final = plan.root / shard_name(index)
        self.tmp = plan.root / f".{shard_name(index)}.tmp{os.getpid()}"
        self.keys: list[str] = []
        self.lengths: list[int] = []
        self.scales: list[np.ndarray] = []  # int8 store: each add's per-row scales
        self.failed: list[dict] = []
        self.file: h5py.File | None = None
        self.data: h5py.Dataset | None = None

    def __enter__(self) -> "ShardWriter":
        with writing(self.plan.root):
            self.sink = _Sink(self.tmp)
        try:
            # libver pinned and no timestamps: the same rows give the same bytes (resume == fresh run).
            # Chunks of 4 KiB and more start on 64-byte boundaries: copying a row out of the memory
            # map is 10% faster from a cache-line-aligned start (the checksum's 4 bytes misalign it).
            self.file = h5py.File(self.sink, "w", libver=("earliest", "v110"),
                                  alignment_threshold=4096, alignment_interval=64)
            self._check_sink()
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def _check_sink(self) -> None:
        if self.sink.error is not None:
            raise write_failure(self.plan.root, self.sink.error)

    def add(self, keys: Sequence[str], rows: np.ndarray | Sequence[np.ndarray]) -> None:
        if len(keys) == 0:
            return
        if self.plan.variable_length:
            for key, row in zip(keys, rows):
                self._append_variable(np.asarray(row, dtype=self.plan.dtype))
                self.keys.append(key)
        else:
            rows = self._stored_rows(rows)
            self._ensure_fixed(rows.shape[1:])
            n = len(self.keys)
            self.data[n:n + len(keys)] = rows
            self.keys.extend(keys)
        self._check_sink()

    def _stored_rows(self, rows) -> np.ndarray:
        if not self.plan.quantised:
            return np.asarray(rows, dtype=self.plan.dtype)
        q, scale = quantise(rows)
        self.scales.append(scale)
        return q

    def fail(self, key: str, source: str, reason: str) -> None:
        self.failed.append({"key": key, "input": source, "reason": reason})

    def _ensure_fixed(self, row_shape: tuple[int, ...]) -> None:
        if self.data is None:
            planned = len(self.plan.shard_range(self.index))
            # one row per chunk: cheap random reads, and Fletcher-32 then is a checksum per row
            self.data = self.file.create_dataset(
                "data", shape=(planned, *row_shape), maxshape=(None, *row_shape), dtype=self.plan.stored,
                chunks=(1, *row_shape), fletcher32=True, track_times=False,
            )
        elif self.data.shape[1:] != row_shape:
            raise BlitextError(f"row shape {row_shape} differs from this cache's {self.data.shape[1:]}")

    def _append_variable(self, row: np.ndarray) -> None:
        if self.data is None:
            self.data = self.file.create_dataset(
                "data", shape=(0, *row.shape[1:]), maxshape=(None, *row.shape[1:]), dtype=self.plan.dtype,
                chunks=(VARIABLE_CHUNK_ROWS, *row.shape[1:]), fletcher32=True, track_times=False,
            )
        start = self.data.shape[0]
        self.data.resize(start + len(row), axis=0)
        self.data[start:] = row
        self.lengths.append(len(row))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            try:
                if exc_type is None:
                    self._write_index()
            finally:
                if self.file is not None:
                    self.file.close()  # cannot fail on I/O: the sink keeps write errors from HDF5
                self.sink.close()
            if exc_type is None:
                self._publish()
        finally:
            with suppress(OSError):  # published, or removed: a failed shard leaves nothing behind
                self.tmp.unlink(missing_ok=True)

    def _publish(self) -> None:
        self._check_sink()
        with writing(self.plan.root):
            publish(self.tmp, self.final)
            write_json(self.plan.root / sidecar_name(self.index), self.sidecar())

    def _write_index(self) -> None:
        if self.data is not None and not self.plan.variable_length:
            self.data.resize(len(self.keys), axis=0)
        self.file.create_dataset("keys", data=np.array(self.keys, dtype=object),
                                 dtype=h5py.string_dtype(), track_times=False)
        if self.data is not None and self.plan.quantised:
            # written whole at the end, one chunk: readers check it once and map it (4 bytes a row)
            scale = np.concatenate(self.scales).astype(SCALE_DTYPE)
            self.file.create_dataset("scale", data=scale, chunks=scale.shape, fletcher32=True, track_times=False)
        if self.plan.variable_length:
            offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)]).astype(np.int64)
            self.file.create_dataset("offsets", data=offsets, fletcher32=True, track_times=False)

    def sidecar(self) -> dict[str, Any]:
        return {
            "file": self.final.name, "rows": len(self.keys), "bytes": self.final.stat().st_size,
            "sha256": sha256_file(self.final), "row_checksum": ROW_CHECKSUM, "keys": self.keys,
            "failed": self.failed,
        }


def finalize(plan: CachePlan) -> dict:
    """Gather every shard's sidecar into manifest.json, and their keys into the key index
    (rank 0, after all ranks finished). The manifest keeps a summary per shard, not its keys."""
    shards, failed = [], []
    row_shape = None
    for i in range(plan.num_shards):
        if not shard_done(plan, i):
            raise BlitextError(f"shard {i} of {plan.root} is not finished; run the same command again to resume")
        sidecar = read_json(plan.root / sidecar_name(i))
        failed.extend(sidecar.pop("failed"))
        del sidecar["keys"]
        shards.append(sidecar)
        if row_shape is None and sidecar["rows"]:
            row_shape = _row_shape(plan, plan.root / sidecar["file"])
    with writing(plan.root):
        index = write_index(plan.root, (read_json(plan.root / sidecar_name(i))["keys"] for i in range(plan.num_shards)),
                            placed_shards(plan.root, shards, plan.variable_length))
    manifest = {
        **plan.run_record(),
        "row_shape": row_shape,
        # whether readers can check every row: shards written before blitext kept checksums have none
        "row_checksum": ROW_CHECKSUM if all(s.get("row_checksum") for s in shards) else None,
        "count": sum(s["rows"] for s in shards),
        "num_failed": len(failed),
        "shards": shards,
        "index": index,
        "failed": failed,
    }
    with writing(plan.root):
        write_json(plan.root / MANIFEST, manifest)
    return manifest


def _row_shape(plan: CachePlan, shard: Path) -> list:
    with h5py.File(shard, "r") as f:
        shape = list(f["data"].shape[1:])
    return [None, *shape] if plan.variable_length else shape
