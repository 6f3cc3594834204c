"""`blitext cache info` and `blitext cache verify`: a summary, and a full integrity check.

Shards written since rows carry HDF5's Fletcher-32 checksum are also checked row by row
(HDF5 checks it as verify reads every row); older shards have none: verify checks them by
their sha256 as before and notes that reads cannot check their rows. An int8 store's row
scales are read (and so checked) too, and must be finite.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from blitext.atomic import sha256_file
from blitext.cache.chunks import H5_ERRORS, chunk_layout
from blitext.cache.manifest import load_manifest, shard_keys
from blitext.cache.quantise import INT8, SCALE_BYTES, stored_dtype

SCAN_ROWS = 256  # rows read at a time when scanning for NaN/inf


def cache_info(root: str | Path) -> dict:
    """Counts, shapes, producer and bytes on disk, from the manifest and file sizes."""
    root = Path(root)
    m = load_manifest(root)
    on_disk = sum((root / s["file"]).stat().st_size for s in m["shards"] if (root / s["file"]).exists())
    store = stored_dtype(m)
    raw = _raw_bytes(root, m, np.dtype(store).itemsize) + (m["count"] * SCALE_BYTES if store == INT8 else 0)
    return {
        "path": str(root), "kind": m["kind"], "producer": m["producer"], "dtype": m["dtype"], "store": store,
        "row_shape": m["row_shape"], "rows": m["count"], "failed": m["num_failed"], "shards": len(m["shards"]),
        "bytes_on_disk": on_disk, "raw_bytes": raw,
        "bytes_per_row": on_disk / max(1, m["count"]), "overhead": on_disk / raw - 1 if raw else None,
        "failures": m["failed"], "provenance": m.get("provenance", {}),
        "row_checksum": m.get("row_checksum"),
    }


def _raw_bytes(root: Path, m: dict, itemsize: int) -> int:
    if not m["variable_length"]:
        return m["count"] * int(np.prod(m["row_shape"] or [0])) * itemsize
    total = 0
    for s in m["shards"]:
        if s["rows"]:
            with h5py.File(root / s["file"], "r") as f:
                total += f["data"].size * itemsize
    return total


@dataclass
class VerifyReport:
    root: Path
    checked_rows: int = 0
    shards_ok: int = 0
    problems: list[str] = field(default_factory=list)
    unchecked_shards: list[str] = field(default_factory=list)  # written without row checksums

    @property
    def notes(self) -> list[str]:
        if not self.unchecked_shards:
            return []
        return [f"{len(self.unchecked_shards)} shard(s) (e.g. {self.unchecked_shards[0]}) were written before rows "
                f"carried checksums: verify checks them by sha256, but reads cannot check their rows; rebuild "
                f"the cache (the same command with a new --out) to have every read checked"]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_cache(root: str | Path, checksums: bool = True) -> VerifyReport:
    """Every shard opens, holds its datasets, matches its checksum and counts, and is finite."""
    root = Path(root)
    m = load_manifest(root)
    report = VerifyReport(root)
    seen: set[str] = set()
    for i, shard in enumerate(m["shards"]):
        keys = shard_keys(root, i, shard)
        problems = _verify_shard(root, {**shard, "keys": keys}, m, checksums, report)
        dup = seen.intersection(keys)
        if dup:
            problems.append(f"{shard['file']}: {len(dup)} key(s) also in an earlier shard, e.g. {sorted(dup)[0]!r}")
        seen.update(keys)
        report.problems.extend(problems)
        report.shards_ok += not problems
        report.checked_rows += shard["rows"]
    if report.checked_rows != m["count"]:
        report.problems.append(f"manifest count {m['count']} != rows in shards {report.checked_rows}")
    return report


def _verify_shard(root: Path, shard: dict, m: dict, checksums: bool, report: VerifyReport) -> list[str]:
    path = root / shard["file"]
    name = shard["file"]
    if not path.is_file():
        return [f"{name}: missing"]
    if path.stat().st_size != shard["bytes"]:
        return [f"{name}: {path.stat().st_size} bytes, manifest says {shard['bytes']}"]
    mismatch = [f"{name}: checksum mismatch (file changed or corrupt)"] if checksums and \
        sha256_file(path) != shard["sha256"] else []
    try:  # on with a mismatch too: the rows below name what is damaged
        with h5py.File(path, "r") as f:
            return mismatch + _verify_contents(f, shard, m, report)
    except H5_ERRORS as e:  # damaged HDF5 metadata raises any of these, not only OSError
        return mismatch + [f"{name}: does not open as HDF5 ({type(e).__name__}: {e})"]


def _verify_contents(f: h5py.File, shard: dict, m: dict, report: VerifyReport) -> list[str]:
    name = shard["file"]
    expected = ["keys"] + (["data"] if shard["rows"] else []) + (["offsets"] if m["variable_length"] else []) \
        + (["scale"] if shard["rows"] and m.get("store") == INT8 else [])
    missing = [d for d in expected if d not in f]
    if missing:
        return [f"{name}: missing dataset(s) {missing}"]
    keys = [k.decode() if isinstance(k, bytes) else k for k in f["keys"][:]]
    if keys != shard["keys"]:
        return [f"{name}: keys differ from the manifest"]
    if not shard["rows"]:
        return []
    data = f["data"]
    if not data.fletcher32:
        report.unchecked_shards.append(name)
    rows = len(f["offsets"]) - 1 if m["variable_length"] else data.shape[0]
    if rows != shard["rows"]:
        return [f"{name}: {rows} rows, manifest says {shard['rows']}"]
    missing = _chunk_problems(data, f, m)
    if missing:  # HDF5 would read those rows as zeros, with no checksum to fail
        return [f"{name}: {len(missing)} row(s) are damaged (first: row {min(missing)}, {missing[min(missing)]}); "
                f"delete it and its .json sidecar and run the command that made the cache again to rebuild it"]
    non_finite, damaged = _scan(data)
    problems = [f"{name}: {non_finite} block(s) hold NaN or inf values"] if non_finite else []
    if "scale" in expected:
        problems += _scale_problems(f["scale"], name)
    if damaged:
        problems.append(f"{name}: {len(damaged)} data row(s) fail their Fletcher-32 checksum "
                        f"(first: row {damaged[0]}): the file is damaged; delete it and its .json sidecar and "
                        f"run the command that made the cache again to rebuild it")
    return problems


def _scale_problems(scale: h5py.Dataset, name: str) -> list[str]:
    """An int8 store's row scales: readable (HDF5 checks their Fletcher-32) and finite."""
    try:
        values = scale[:]
    except H5_ERRORS:
        return [f"{name}: its row scales fail their Fletcher-32 checksum: the file is damaged; delete it and "
                f"its .json sidecar and run the command that made the cache again to rebuild it"]
    bad = np.flatnonzero(~np.isfinite(values))
    return [f"{name}: {len(bad)} row(s) hold NaN or inf values (first: row {bad[0]})"] if len(bad) else []


def _chunk_problems(data: h5py.Dataset, f: h5py.File, m: dict) -> dict[int, str]:
    """Rows whose chunk the shard's chunk index lost or places outside the file."""
    layout = chunk_layout(data, Path(f.filename).stat().st_size)
    if layout is None:
        return {}
    return layout.damaged_rows(f["offsets"][:] if m["variable_length"] else None)


def _scan(data: h5py.Dataset) -> tuple[int, list[int]]:
    """(blocks holding NaN or inf, rows HDF5 refuses to read: their checksum fails)."""
    non_finite, damaged = 0, []
    for start in range(0, data.shape[0], SCAN_ROWS):
        try:
            non_finite += not np.isfinite(data[start:start + SCAN_ROWS]).all()
        except H5_ERRORS:
            damaged.extend(_unreadable_rows(data, range(start, min(start + SCAN_ROWS, data.shape[0]))))
    return non_finite, damaged


def _unreadable_rows(data: h5py.Dataset, rows: range) -> list[int]:
    bad = []
    for r in rows:
        try:
            data[r]
        except H5_ERRORS:
            bad.append(r)
    return bad
