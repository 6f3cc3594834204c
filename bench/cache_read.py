"""Cache random reads vs numpy reading the same bytes from a memory-mapped .npy; bytes on disk.

    python bench/cache_read.py [--rows 2000] [--reads 4000]

Goal (issue 11): random-read samples/s >= 0.9 x the .npy memmap's. Both files are read once
first so both come from the page cache; reads are the same random keys in the same order, in
rounds that alternate between the two (the machine is shared: drift hits both alike).

Rows carry a Fletcher-32 checksum, checked when a process first reads a row;
later reads come from the memory map. `first_read_*` times that first, checked pass over every
row in a new FeatureCache against one memmap pass over the same rows.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

from blitext.cache import CachePlan, FeatureCache, ShardWriter, finalize, pending_shards, start_or_resume  # noqa: E402
from blitext.cache.verify import cache_info  # noqa: E402

ROW = (49, 1280)  # EfficientNet-Lite0 tokens; ViT-g's 257 x 1408 rows are 6x larger (cheaper per byte)


def build(root: Path, rows: np.ndarray, shard_size: int) -> None:
    keys = [f"img-{i}" for i in range(len(rows))]
    plan = CachePlan(root, "image-features", {"encoder": "bench"}, keys, shard_size)
    start_or_resume(plan)
    for s in pending_shards(plan):
        with ShardWriter(plan, s) as w:
            r = plan.shard_range(s)
            w.add(keys[r.start:r.stop], rows[r.start:r.stop])
    finalize(plan)


def timed(read, order) -> float:
    t = time.perf_counter()
    for i in order:
        read(i)
    return len(order) / (time.perf_counter() - t)


def alternating(reads: dict, order, rounds: int = 5) -> dict[str, float]:
    """Best samples/s of each reader over `rounds` rounds that take turns."""
    best = dict.fromkeys(reads, 0.0)
    for _ in range(rounds):
        for name, read in reads.items():
            best[name] = max(best[name], timed(read, order))
    return best


def first_reads(root: Path, mm, n: int, rounds: int = 3) -> dict[str, float]:
    """Every row read once by a new FeatureCache (its shards opened first, untimed) vs the memmap."""
    best = {"cache": 0.0, "npy": 0.0}
    order = np.random.default_rng(1).permutation(n)
    for _ in range(rounds):
        cache = FeatureCache(root)
        keys = cache.keys
        for s in range(len(cache.manifest["shards"])):
            cache._shard(s)
        best["cache"] = max(best["cache"], timed(lambda i: cache[keys[i]], order))
        best["npy"] = max(best["npy"], timed(lambda i: np.array(mm[i]), order))
        cache.close()
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--reads", type=int, default=4000)
    ap.add_argument("--shard-size", type=int, default=1024)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((args.rows, *ROW)).astype(np.float16)
    order = rng.integers(0, args.rows, args.reads)
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent.parent / "cache") as tmp:
        tmp = Path(tmp)
        build(tmp / "cache", rows, args.shard_size)
        np.save(tmp / "rows.npy", rows)
        cache = FeatureCache(tmp / "cache")
        keys = cache.keys
        mm = np.load(tmp / "rows.npy", mmap_mode="r")
        for i in range(args.rows):  # warm the page cache for both
            cache[keys[i]], np.array(mm[i])
        rates = alternating({"npy": lambda i: np.array(mm[i]), "cache": lambda i: cache[keys[i]]}, order)
        first = first_reads(tmp / "cache", mm, args.rows)
        info = cache_info(tmp / "cache")
        assert all(np.array_equal(cache[keys[i]], rows[i]) for i in order[:50])
        cache.close()
    write_result("cache_read", {
        "command": "python bench/cache_read.py", "rows": args.rows, "row_shape": list(ROW), "dtype": "float16",
        "random_reads": args.reads, "cache_samples_per_s": round(rates["cache"], 1),
        "npy_memmap_samples_per_s": round(rates["npy"], 1), "ratio": round(rates["cache"] / rates["npy"], 3),
        "goal": ">= 0.9", "row_checksum": info.get("row_checksum"),
        "first_read_cache_samples_per_s": round(first["cache"], 1),
        "first_read_npy_samples_per_s": round(first["npy"], 1),
        "first_read_ratio": round(first["cache"] / first["npy"], 3),
        "bytes_on_disk_per_sample": round(info["bytes_per_row"], 1), "raw_fp16_bytes_per_sample": 2 * ROW[0] * ROW[1],
        "disk_overhead_vs_raw": round(info["overhead"], 5),
    })


if __name__ == "__main__":
    main()
