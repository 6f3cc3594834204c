"""Lookup and read rates of caches of several sizes, measured side by side in one process.

    PYTHONPATH=. python bench/scale_rates.py CACHE... [--rounds 30] [--batch 512]

bench/scale.py measures each size in a fresh process, one size after another: its rates drift
with whatever else the shared machine runs meanwhile (two runs of the same cache differed by
20-40%), more than the differences between sizes that issue 20's goal is about (read and lookup
rates at 10^7 rows within 10% of 10^4's). Here every cache is open in one process and each round
times every (cache, way) once, in turn, in CPU time: a figure is the best round's (and the median
round's), and each size is compared with the first cache's figure from the same rounds.

Ways, over the same keys at every size:
- `lookup`: KeyIndex.locate, one key at a time (20,000 random keys, with repeats);
- `lookup_batched`: KeyIndex.locate_many in batches of --batch keys (how get_batch and a
  DataLoader's batches find them);
- `read`: cache[key], one key at a time (20,000 distinct random keys, each read once before the
  rounds: the rows are checked and served from the memory maps);
- `read_batched`: FeatureCache.get_many in batches of --batch keys;
- `shard0_batched`: get_many as read_batched, of keys of the first shard only (up to 20,000
  distinct): their lookups touch the whole index as before, their rows lie in one shard file. Its
  ratio against read_batched's tells what the rows' own spread over the shards costs, apart from
  the index.

`--footprint` instead reads the last cache in batches from growing parts of it (the rows of its
first 1, 3, 10, 30 and 100 shards, and 1,000 rows of each of its first 100 shards), beside the
first cache read whole, in the same rounds: whether a batched read's cost follows how many bytes
of rows it ranges over, or how many shards it opens.

`--windows 4 6 8` instead times batched lookups (locate_many) of every cache with each of these
numbers of slots read from a key's home at a time (keyindex.WINDOW), in the same rounds: a walk
longer than the window costs another round of gathers, and how many keys need one depends on the
table's load (40-80% full by the number of keys).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import git_commit, write_result  # noqa: E402

KEYS = 20_000
WAYS = ("lookup", "lookup_batched", "read", "read_batched", "shard0_batched")


def ways(cache, batch: int) -> dict:
    """Each way as a function of its keys."""
    index = cache.index
    batches = lambda keys: (keys[i:i + batch] for i in range(0, len(keys), batch))  # noqa: E731
    return {"lookup": lambda keys: [index.locate(k) for k in keys],
            "lookup_batched": lambda keys: [index.locate_many(b) for b in batches(keys)],
            "read": lambda keys: [cache[k] for k in keys],
            "read_batched": lambda keys: [cache.get_many(b) for b in batches(keys)],
            "shard0_batched": lambda keys: [cache.get_many(b) for b in batches(keys)]}


def timed_rounds(calls: dict, rounds: int) -> dict:
    """CPU seconds per item of each call, key -> (function, items), as an array over `rounds`
    rounds; each round times every call once, in turn, so the machine's drift falls on all alike."""
    seconds = {key: [] for key in calls}
    for _ in range(rounds):
        for key, (run, items) in calls.items():
            t0 = time.process_time()
            run()
            seconds[key].append((time.process_time() - t0) / items)
    return {key: np.array(s) for key, s in seconds.items()}


def _in_batches(read, keys: list[str], batch: int):
    """A call of `read` on each batch of `keys`, as a function of nothing (timed_rounds' calls)."""
    return lambda: [read(keys[i:i + batch]) for i in range(0, len(keys), batch)]


def side_by_side(roots: list[Path], rounds: int, batch: int) -> list[dict]:
    from blitext.cache import FeatureCache

    caches, keys = [], []
    for root in roots:
        cache = FeatureCache(root)
        rng = np.random.default_rng(1)
        n = len(cache)
        first = cache.manifest["shards"][0]["rows"] if n else 0
        keys.append({"lookup": [cache.keys[i] for i in rng.integers(0, n, KEYS).tolist()],
                     "read": [cache.keys[i] for i in rng.choice(n, min(KEYS, n), replace=False).tolist()],
                     "shard0": [cache.keys[i] for i in rng.choice(first, min(KEYS, first), replace=False).tolist()]})
        for chosen in (keys[-1]["read"], keys[-1]["shard0"]):
            cache.get_many(chosen)  # first reads: shards opened, rows checked
        caches.append(ways(cache, batch))
    calls = {(c, way): (functools.partial(run[way], keys[c][way.split("_")[0]]), len(keys[c][way.split("_")[0]]))
             for c, run in enumerate(caches) for way in WAYS}
    seconds = timed_rounds(calls, rounds)
    return [_figures(root, {way: seconds[c, way] for way in WAYS}, {way: seconds[0, way] for way in WAYS})
            for c, root in enumerate(roots)]


def footprint(small: Path, big: Path, rounds: int, batch: int) -> list[dict]:
    """Batched reads (get_many) from parts of `big` of growing size, beside `small` read whole."""
    from blitext.cache import FeatureCache

    rng = np.random.default_rng(1)
    caches = {root: FeatureCache(root) for root in (small, big)}
    per_shard = caches[big].manifest["shards"][0]["rows"]
    shards = len(caches[big].manifest["shards"])
    parts = {"whole": (small, rng.choice(len(caches[small]), min(KEYS, len(caches[small])), replace=False))}
    for n in (1, 3, 10, 30, 100):
        if n <= shards:
            parts[f"first {n} shards"] = (big, rng.choice(n * per_shard, min(KEYS, n * per_shard), replace=False))
    first_rows = min(1000, per_shard)
    n = min(100, shards)
    parts[f"{first_rows} rows of each of the first {n} shards"] = (
        big, rng.integers(0, n, KEYS) * per_shard + rng.integers(0, first_rows, KEYS))
    keys = {name: [caches[root].keys[i] for i in rows.tolist()] for name, (root, rows) in parts.items()}
    for name, (root, _) in parts.items():
        caches[root].get_many(keys[name])  # first reads: shards opened, rows checked
    seconds = timed_rounds({name: (_in_batches(caches[root].get_many, keys[name], batch), len(keys[name]))
                            for name, (root, _) in parts.items()}, rounds)
    whole = seconds["whole"]
    return [{"part": name, "cache": str(parts[name][0]), "rows_ranged": int(parts[name][1].max()) + 1,
             "read_batched_best_per_s": round(1 / s.min()), "vs_first_best": round(float(whole.min() / s.min()), 3),
             "vs_first_median": round(float(np.median(whole / s)), 3)} for name, s in seconds.items()]


def windows(roots: list[Path], sizes: list[int], rounds: int, batch: int) -> list[dict]:
    """Batched lookups of every cache at each keyindex.WINDOW in `sizes`, against the first cache at
    the first size."""
    from blitext.cache import FeatureCache, keyindex

    caches = [FeatureCache(root) for root in roots]
    rng = np.random.default_rng(1)
    keys = [[c.keys[i] for i in rng.integers(0, len(c), KEYS).tolist()] for c in caches]
    def at_window(w: int, lookups):
        return lambda: (setattr(keyindex, "WINDOW", w), lookups())

    kept = keyindex.WINDOW
    try:
        seconds = timed_rounds({(w, c): (at_window(w, _in_batches(cache.index.locate_many, keys[c], batch)), KEYS)
                                for w in sizes for c, cache in enumerate(caches)}, rounds)
    finally:
        keyindex.WINDOW = kept
    first = seconds[sizes[0], 0]
    out = []
    for w in sizes:
        own = seconds[w, 0]
        for c, cache in enumerate(caches):
            s = seconds[w, c]
            out.append({"window": w, "cache": str(roots[c]), "rows": len(cache),
                        "load": round(len(cache) / 2 ** keyindex.slot_bits(len(cache)), 3),
                        "us_per_key_median": round(float(np.median(s)) * 1e6, 3),
                        "vs_first_window_first_cache_median": round(float(np.median(first / s)), 3),
                        "vs_own_window_first_cache_median": round(float(np.median(own / s)), 3)})
    return out


def _figures(root: Path, mine: dict, first: dict) -> dict:
    out = {"cache": str(root)}
    for way, s in mine.items():
        out[f"{way}_best_per_s"] = round(1 / s.min())
        out[f"{way}_median_per_s"] = round(1 / np.median(s))
        # this size's rate over the first cache's: the best rounds, and round by round (the median ratio)
        out[f"{way}_vs_first_best"] = round(float(first[way].min() / s.min()), 3)
        out[f"{way}_vs_first_median"] = round(float(np.median(first[way] / s)), 3)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("caches", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--result", default=None, help="also write bench/results/<RESULT>.json (bench/scale.py reads stdout)")
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    ap.add_argument("--footprint", action="store_true", help="batched reads from growing parts of the last cache (above)")
    ap.add_argument("--windows", type=int, nargs="*", help="batched lookups at each of these keyindex.WINDOW (above)")
    args = ap.parse_args(argv)
    commit = git_commit()  # when it starts: a commit made while it runs is not the one measured
    kind = "footprint" if args.footprint else "windows" if args.windows else "side_by_side"
    if args.footprint:
        figures = footprint(args.caches[0], args.caches[-1], args.rounds, args.batch)
    elif args.windows:
        figures = windows(args.caches, args.windows, args.rounds, args.batch)
    else:
        figures = side_by_side(args.caches, args.rounds, args.batch)
    print(json.dumps(figures))
    if args.result:
        write_result(args.result, {"commit": commit, "command": " ".join(["python bench/scale_rates.py", *(argv or sys.argv[1:])]),
                                   "note": args.note, "rounds": args.rounds, "batch": args.batch, "keys": KEYS,
                                   kind: figures})


if __name__ == "__main__":
    main()
