"""Cache random reads vs numpy reading the same bytes from a memory-mapped .npy; bytes on disk.

    python bench/cache_read.py [--rows 2000] [--reads 4000]

Goal (issue 2): random-read samples/s >= 0.8 x the .npy memmap's. Both files are read once
first so both come from the page cache; reads are the same random keys in the same order.
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


def timed_reads(read, order, repeats=3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for i in order:
            read(i)
        best = min(best, time.perf_counter() - t)
    return len(order) / best


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
        cache_rate = timed_reads(lambda i: cache[keys[i]], order)
        npy_rate = timed_reads(lambda i: np.array(mm[i]), order)
        info = cache_info(tmp / "cache")
        assert all(np.array_equal(cache[keys[i]], rows[i]) for i in order[:50])
    write_result("cache_read", {
        "command": "python bench/cache_read.py", "rows": args.rows, "row_shape": list(ROW), "dtype": "float16",
        "random_reads": args.reads, "cache_samples_per_s": round(cache_rate, 1),
        "npy_memmap_samples_per_s": round(npy_rate, 1), "ratio": round(cache_rate / npy_rate, 3), "goal": ">= 0.8",
        "bytes_on_disk_per_sample": round(info["bytes_per_row"], 1), "raw_fp16_bytes_per_sample": 2 * ROW[0] * ROW[1],
        "disk_overhead_vs_raw": round(info["overhead"], 5),
    })


if __name__ == "__main__":
    main()
