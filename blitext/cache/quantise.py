"""The 8-bit feature store (`extract-features --store int8`): each row as int8 with one float32
scale, symmetric: x ~ q * scale, q in [-127, 127], scale = max |x| / 127. Half the bytes of
fp16, so half the bytes read per epoch; readers get the cache's dtype back (dequantise).

One scale per row, not per channel: a per-row scale makes dequantising a lookup in a
256-entry table (about 4x faster than multiplying in numpy), and per channel would add D floats
a row (+8% bytes at D = 1280) for about half the error (0.36% against 0.64% relative on the
demo's features; docs/scale.md#the-8-bit-feature-store).
"""
from __future__ import annotations

import numpy as np

INT8 = "int8"
STORES = {"fp16": None, INT8: INT8}  # --store -> CachePlan.store (None: rows stored as the dtype)
LEVEL = 127  # symmetric: -128 is never written, so q and -q are both representable
SCALE_DTYPE = np.float32
SCALE_BYTES = np.dtype(SCALE_DTYPE).itemsize
# q's value for each byte 0..255 read as uint8: a row's lookup table is VALUES * its scale
VALUES = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float32)


def quantise(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 (N, ...), scale float32 (N,)) of float rows (N, ...). A row holding NaN or inf
    keeps a non-finite scale (its q are 0), so `cache verify` reports it and reads give NaN, as
    an fp16 row's NaN would be read back."""
    x = np.asarray(rows, dtype=np.float32)
    flat = x.reshape(len(x), -1)
    scale = (np.abs(flat).max(axis=1, initial=0.0) / LEVEL).astype(SCALE_DTYPE)
    usable = np.isfinite(scale) & (scale > 0)
    divisor = np.where(usable, scale, 1)[:, None]
    q = np.clip(np.rint(flat / divisor), -LEVEL, LEVEL)
    q[~usable] = 0
    return q.astype(np.int8).reshape(x.shape), scale


def dequantise(q: np.ndarray, scale: float, dtype) -> np.ndarray:
    """One row back in `dtype`: equal to (q * scale) computed in float32, then cast."""
    table = (VALUES * SCALE_DTYPE(scale)).astype(dtype)
    return np.take(table, q.view(np.uint8))


def stored_dtype(record: dict) -> str:
    """The dtype of the values in a cache's shards, from its manifest, run.json or summary: caches
    written before stores had a name hold their dtype."""
    return record.get("store") or record["dtype"]


def store_name(stored: str) -> str:
    """The --store value that writes rows as `stored` ("float16" -> "fp16")."""
    return {"float16": "fp16"}.get(stored, stored)
