"""Storage a user can plan: bytes per row, and what N rows will take, before or after a run.

A fixed row is its values plus HDF5's 4-byte Fletcher-32 checksum (the row is its own chunk),
plus, in an int8 store, its 4-byte scale, plus per key: HDF5's chunk index and the key in the shard, the key in the shard's JSON sidecar,
and the key in the key index with its offset, its slot (hash, row, key span) and the row's place in its shard
(index/places.npy, 8 bytes: written for fixed rows, which are what is estimated here). `cache info`
measures the real figure on disk; `extract-features --dry-run` estimates it before anything is written.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from blitext.cache.keyindex import INDEX_DIR
from blitext.cache.manifest import sidecar_name
from blitext.cache.quantise import INT8, SCALE_BYTES

# rows shown by default: COCO-size (~0.6M captions), the paper's 4M pairs, BLIP-2's 129M
PROJECTED_ROWS = (1_000_000, 4_000_000, 129_000_000)
CHECKSUM_BYTES = 4   # Fletcher-32 per chunk (= per fixed row)
# Bytes per row besides the values, the checksum and 3 copies of the key (shard, sidecar, index):
# measured on bench/scale.py's 10^5-row cache (26-byte keys): 289 B/row on disk, 68 of them values
# and checksum, 78 the keys; the other 143 are HDF5's chunk index and string heap, JSON quoting,
# and the index's ~40 bytes (an 8-byte offset and 24-byte slots 76% full; 30-60 B at 40-80%).
# places.npy, written since, adds 8 bytes a row (an int64 offset): 151.
ROW_OVERHEAD_BYTES = 143 + 8


def estimated_row_bytes(row_shape, dtype: str, key_bytes: int) -> int:
    """Bytes one fixed row will take on disk with its key (see ROW_OVERHEAD_BYTES); `dtype`: the
    values stored ("int8": an int8 store, which adds a scale per row)."""
    values = int(np.prod(row_shape)) * np.dtype(dtype).itemsize + (SCALE_BYTES if dtype == INT8 else 0)
    return values + CHECKSUM_BYTES + 3 * key_bytes + ROW_OVERHEAD_BYTES


def cache_bytes(root: str | Path, shards: list[dict]) -> int:
    """What a finished cache holds on disk: shards, their sidecars and the key index."""
    root = Path(root)
    files = [root / s["file"] for s in shards] + [root / sidecar_name(i) for i in range(len(shards))]
    return sum(f.stat().st_size for f in files if f.is_file()) + index_bytes(root)


def index_bytes(root: str | Path) -> int:
    folder = Path(root) / INDEX_DIR
    return sum(f.stat().st_size for f in folder.iterdir()) if folder.is_dir() else 0


def human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(nbytes) < 1000 or unit == "PB":
            return f"{nbytes:,.0f} {unit}" if unit == "B" else f"{nbytes:,.1f} {unit}"
        nbytes /= 1000


def projections(bytes_per_row: float, rows: tuple[int, ...] = PROJECTED_ROWS) -> list[tuple[int, str]]:
    """(rows, size) for each row count: decimal units, as disks are sold."""
    return [(n, human(bytes_per_row * n)) for n in rows]


def projection_line(bytes_per_row: float, rows: tuple[int, ...] = PROJECTED_ROWS) -> str:
    return ", ".join(f"{n:,} rows: {size}" for n, size in projections(bytes_per_row, rows))
