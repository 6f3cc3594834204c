"""`blitext cache info` and `blitext cache verify`: a summary, and a full integrity check."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from blitext.cache.manifest import load_manifest
from blitext.atomic import sha256_file

SCAN_ROWS = 256  # rows read at a time when scanning for NaN/inf


def cache_info(root: str | Path) -> dict:
    """Counts, shapes, producer and bytes on disk, from the manifest and file sizes."""
    root = Path(root)
    m = load_manifest(root)
    on_disk = sum((root / s["file"]).stat().st_size for s in m["shards"] if (root / s["file"]).exists())
    itemsize = np.dtype(m["dtype"]).itemsize
    raw = _raw_bytes(root, m, itemsize)
    return {
        "path": str(root), "kind": m["kind"], "producer": m["producer"], "dtype": m["dtype"],
        "row_shape": m["row_shape"], "rows": m["count"], "failed": m["num_failed"], "shards": len(m["shards"]),
        "bytes_on_disk": on_disk, "raw_bytes": raw,
        "bytes_per_row": on_disk / max(1, m["count"]), "overhead": on_disk / raw - 1 if raw else None,
        "failures": m["failed"], "provenance": m.get("provenance", {}),
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

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_cache(root: str | Path, checksums: bool = True) -> VerifyReport:
    """Every shard opens, holds its datasets, matches its checksum and counts, and is finite."""
    root = Path(root)
    m = load_manifest(root)
    report = VerifyReport(root)
    seen: set[str] = set()
    for shard in m["shards"]:
        problems = _verify_shard(root, shard, m, checksums)
        dup = seen.intersection(shard["keys"])
        if dup:
            problems.append(f"{shard['file']}: {len(dup)} key(s) also in an earlier shard, e.g. {sorted(dup)[0]!r}")
        seen.update(shard["keys"])
        report.problems.extend(problems)
        report.shards_ok += not problems
        report.checked_rows += shard["rows"]
    if report.checked_rows != m["count"]:
        report.problems.append(f"manifest count {m['count']} != rows in shards {report.checked_rows}")
    return report


def _verify_shard(root: Path, shard: dict, m: dict, checksums: bool) -> list[str]:
    path = root / shard["file"]
    name = shard["file"]
    if not path.is_file():
        return [f"{name}: missing"]
    if path.stat().st_size != shard["bytes"]:
        return [f"{name}: {path.stat().st_size} bytes, manifest says {shard['bytes']}"]
    if checksums and sha256_file(path) != shard["sha256"]:
        return [f"{name}: checksum mismatch (file changed or corrupt)"]
    try:
        with h5py.File(path, "r") as f:
            return _verify_contents(f, shard, m)
    except OSError as e:
        return [f"{name}: does not open as HDF5 ({e})"]


def _verify_contents(f: h5py.File, shard: dict, m: dict) -> list[str]:
    name = shard["file"]
    expected = ["keys"] + (["data"] if shard["rows"] else []) + (["offsets"] if m["variable_length"] else [])
    missing = [d for d in expected if d not in f]
    if missing:
        return [f"{name}: missing dataset(s) {missing}"]
    keys = [k.decode() if isinstance(k, bytes) else k for k in f["keys"][:]]
    if keys != shard["keys"]:
        return [f"{name}: keys differ from the manifest"]
    if not shard["rows"]:
        return []
    data = f["data"]
    rows = len(f["offsets"]) - 1 if m["variable_length"] else data.shape[0]
    if rows != shard["rows"]:
        return [f"{name}: {rows} rows, manifest says {shard['rows']}"]
    bad = _non_finite_rows(data)
    return [f"{name}: {bad} block(s) hold NaN or inf values"] if bad else []


def _non_finite_rows(data: h5py.Dataset) -> int:
    bad = 0
    for start in range(0, data.shape[0], SCAN_ROWS):
        bad += not np.isfinite(data[start:start + SCAN_ROWS]).all()
    return bad
