"""Per-process costs of a cache against its number of rows: do they stay flat (or O(shards))?

    PYTHONPATH=. python bench/scale.py [--sizes 10000 100000 1000000 10000000] [--shard-size 100000] [--copy-shards]

For each size, a synthetic cache of tiny rows (4 x 8 fp16: the rows' bytes are not what is
measured) is built once, then a fresh process measures:
- `open_s`: FeatureCache(root), the manifest read and the key index mapped;
- `rss_open_mb` / `rss_after_reads_mb`: the process's resident memory after opening and after
  the reads below (the imports alone, blitext.cache without torch: `rss_imports_mb`);
  `private_dirty_after_reads_mb`: the part of it the process wrote itself; `anon_rss_after_reads_mb`
  / `file_rss_after_reads_mb`: the kernel's split of RSS into the process's own memory and mapped
  file pages. RSS and USS also count the pages of the memory-mapped
  index and shards that the reads touched (with the kernel's fault-around, 64 KB per touch):
  page cache, shared with every process that maps them and dropped under memory pressure;
- `uss_one_shard_open_mb`: what reading one row of shard 0 added (the shard's per-row state);
- `first_read_per_s`: distinct random keys read once each (looked up, opened, checked by HDF5);
  `reread_per_s`: the same keys again (from the memory map);
- `lookup_per_s`: random keys located (hash search + stored-key check), no row read, the second
  time (`lookup_first_per_s`: the first, while the index's pages come in from the page cache);
- `worker_uss_mb`: the unique memory (USS) of each of 4 DataLoader workers after one shuffled
  pass over `pass_rows` rows (every row up to --pass-rows, else a random subset of that many);
  `worker_private_dirty_mb`: the part of each that the worker wrote (its heap, pages copied
  from the parent on write), without the pages of mapped files a worker alone read (USS counts
  those, though they are page cache the kernel can drop).
  `*_uss_mb` of the main process likewise.
With --inputs N..., the readers of inputs instead (bench/scale_inputs.py, whose docstring says
what each reader reads and which figures it records), each at N entries, in a fresh process.
After every size, `side_by_side`: bench/scale_rates.py with every size's cache open in one
process, lookups and reads one key at a time and in batches (locate_many, get_many), timed in
--rounds rounds that visit every size in turn, each compared with the first size in the same
rounds (`*_vs_first_best`, `*_vs_first_median`): the per-size rates above, from processes run one
after another, drift with the shared machine's load more than the sizes differ.
Goals (issue 20) at 10^7 rows: open < 1 s, RSS < 200 MB, worker USS < 50 MB, read and lookup
rates within 10% of their 10^4-row values. Timings on a shared machine: compare runs made together.

--copy-shards writes shard 0 and copies its file to the other full shards, under their own keys
in the sidecars and the key index (a reader never reads a shard's own keys dataset): writing
10^5 one-chunk rows through HDF5 takes a minute or more on 2 shared cores, so 10^7 written rows
would take hours. The result records the commit, the command and the load average around each size.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import private_dirty_mb, uss_mb, write_result  # noqa: E402
from scale_inputs import READERS, measure_inputs  # noqa: E402

ROW = (4, 8)
READS = 20_000
LOOKUPS = 100_000


def build(root: Path, n: int, shard_size: int, copy_shards: bool = False) -> dict:
    """A cache of n rows keyed like COCO ("COCO_train2014_000000123456"); returns build timings."""
    from blitext.atomic import read_json, write_json
    from blitext.cache import CachePlan, ShardWriter, finalize, pending_shards, start_or_resume
    from blitext.cache.manifest import shard_name, sidecar_name

    t0 = time.perf_counter()
    keys = [f"COCO_train2014_{i:012d}" for i in range(n)]
    plan = CachePlan(root, "image-features", {"encoder": "bench-scale"}, keys, shard_size)
    start_or_resume(plan)
    rng = np.random.default_rng(0)
    for s in pending_shards(plan):
        r = plan.shard_range(s)
        if copy_shards and s > 0 and len(r) == shard_size:
            shutil.copyfile(root / shard_name(0), root / shard_name(s))
            write_json(root / sidecar_name(s), {**read_json(root / sidecar_name(0)), "file": shard_name(s),
                                                "keys": keys[r.start:r.stop]})
            continue
        with ShardWriter(plan, s) as w:
            w.add(keys[r.start:r.stop], rng.standard_normal((len(r), *ROW)).astype(np.float16))
    t1 = time.perf_counter()
    finalize(plan)
    t2 = time.perf_counter()
    # Pages just written stay dirty in the page cache until written back, and smaps counts a
    # dirty page as Private_Dirty of any process that alone maps it: the measures below would
    # count the cache's own files as the reader's memory.
    os.sync()
    return {"shards_copied": copy_shards and n > shard_size, "build_shards_s": round(t1 - t0, 2), "finalize_s": round(t2 - t1, 2),
            "index_mb": round(sum(f.stat().st_size for f in (root / "index").iterdir()) / 2**20, 2),
            "manifest_kb": round((root / "manifest.json").stat().st_size / 1024, 1)}


def measure(root: Path, pass_rows: int) -> dict:
    """Run in a fresh process: every figure of one cache (see the module docstring)."""
    import psutil

    from blitext.cache import FeatureCache  # torch comes later, for the workers: the reader does not import it

    me = psutil.Process()
    out = {"rss_imports_mb": me.memory_info().rss / 2**20, "uss_imports_mb": uss_mb(me)}
    t0 = time.perf_counter()
    cache = FeatureCache(root)
    out["open_s"] = time.perf_counter() - t0
    out["rss_open_mb"] = me.memory_info().rss / 2**20
    out["uss_open_mb"] = uss_mb(me)
    cache[cache.keys[0]]  # opens shard 0: what one opened shard costs this process
    out["uss_one_shard_open_mb"] = uss_mb(me) - out["uss_open_mb"]
    n = len(cache)
    rng = np.random.default_rng(1)
    picks = rng.choice(n, size=min(READS, n), replace=False).tolist()
    keys = [cache.keys[i] for i in picks]
    out["first_read_per_s"] = _rate(lambda: [cache[k] for k in keys], len(keys))
    out["reread_per_s"] = _rate(lambda: [cache[k] for k in keys], len(keys))
    lookups = [cache.keys[i] for i in rng.integers(0, n, LOOKUPS).tolist()]
    out["lookup_first_per_s"] = _rate(lambda: [cache.locate(k) for k in lookups], len(lookups))  # index pages faulted in
    out["lookup_per_s"] = _rate(lambda: [cache.locate(k) for k in lookups], len(lookups))
    out["rss_after_reads_mb"] = me.memory_info().rss / 2**20
    out["uss_after_reads_mb"] = uss_mb(me)
    out["private_dirty_after_reads_mb"] = private_dirty_mb(me.pid)
    out.update(_rss_parts(me.pid, "after_reads"))
    # The workers fork from a process that has only opened the cache, as a trainer's does: a
    # forked worker drops the parent's open shards, and freeing their state would copy those
    # pages into the worker (the copy-on-write growth of PyTorch issue #13246), here an artefact
    # of the reads measured above.
    cache.close()
    del cache, keys, lookups
    gc.collect()
    import torch

    out.update(_worker_pass(FeatureCache(root), rng, pass_rows, torch, me))
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def _rate(fn, count: int) -> float:
    t0 = time.perf_counter()
    fn()
    return count / (time.perf_counter() - t0)


def _worker_pass(cache, rng, pass_rows: int, torch, me) -> dict:
    """4 forked workers, one shuffled pass; their USS read while they are still alive."""
    n = len(cache)
    dataset = cache.dataset()  # keys stay in the memory-mapped index: no per-row list
    subset = None if n <= pass_rows else rng.choice(n, pass_rows, replace=False)
    sampler = torch.utils.data.SubsetRandomSampler(subset) if subset is not None else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=512, shuffle=sampler is None, sampler=sampler,
                                         num_workers=4, persistent_workers=True, collate_fn=_count)
    t0 = time.perf_counter()
    rows = sum(loader)
    seconds = time.perf_counter() - t0
    workers = me.children()
    uss = [round(uss_mb(w), 1) for w in workers]
    dirty = [round(private_dirty_mb(w.pid), 1) for w in workers]
    del loader
    return {"pass_rows": rows, "pass_rows_per_s": rows / seconds, "worker_uss_mb": uss, "worker_private_dirty_mb": dirty,
            "rss_parent_after_pass_mb": me.memory_info().rss / 2**20}


def _rss_parts(pid: int, when: str) -> dict:
    """RSS split as the kernel counts it: anonymous (the process's own heap and stacks) and
    file-backed (pages of mapped files: the shared, reclaimable page cache)."""
    parts = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            parts[f"{name[3:].lower()}_rss_{when}_mb"] = round(int(value.split()[0]) / 1024, 1)
    return parts


def _count(batch) -> int:
    return len(batch)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    ap.add_argument("--shard-size", type=int, default=100_000)
    ap.add_argument("--pass-rows", type=int, default=1_000_000, help="rows the workers' pass reads at most")
    ap.add_argument("--workdir", default=None, help="where the caches are built (default: a temp folder)")
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile (rates are shared-CPU figures)")
    ap.add_argument("--copy-shards", action="store_true", help="write shard 0, copy it to the other shards (see above)")
    ap.add_argument("--keep", action="store_true", help="keep the caches")
    ap.add_argument("--rounds", type=int, default=30, help="rounds of bench/scale_rates.py over every size at the end (0: none)")
    ap.add_argument("--result", default="scale", help="the file under bench/results/ (without .json)")
    ap.add_argument("--inputs", type=int, nargs="*", default=None, help="measure the input readers at these sizes")
    ap.add_argument("--readers", nargs="+", default=list(READERS), choices=READERS, help="with --inputs: which")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one cache, in a fresh process
    ap.add_argument("--measure-inputs", type=int, default=None, help=argparse.SUPPRESS)  # internal: likewise
    ap.add_argument("--reader", default="pairs", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.pass_rows)))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="blitext-scale-"))
    if args.measure_inputs:
        print(json.dumps(measure_inputs(work, args.measure_inputs, args.reader)))
        return
    if args.inputs:
        return measure_all_inputs(work, args)
    results = []
    for n in args.sizes:
        root = work / f"rows-{n}"
        shutil.rmtree(root, ignore_errors=True)
        load_before = os.getloadavg()[0]
        built = build(root, n, args.shard_size, args.copy_shards)
        t0 = time.perf_counter()
        figures = subprocess.run([sys.executable, __file__, "--measure", str(root), "--pass-rows", str(args.pass_rows)],
                                 check=True, capture_output=True, text=True).stdout
        results.append({"rows": n, "shards": -(-n // args.shard_size), **built, **json.loads(figures.splitlines()[-1]),
                        "measure_s": round(time.perf_counter() - t0, 1),
                        "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)]})
        print(json.dumps(results[-1]), flush=True)
    roots = [work / f"rows-{n}" for n in args.sizes]
    side_by_side = _side_by_side(roots, args.rounds) if args.rounds else []
    if not args.keep:
        for root in roots:
            shutil.rmtree(root)
    write_result(args.result, {**provenance(argv), "note": args.note, "row_shape": list(ROW), "dtype": "float16",
                           "shard_size": args.shard_size, "reads": READS, "lookups": LOOKUPS, "pass_rows": args.pass_rows,
                           "sizes": results, "side_by_side": side_by_side})


def _side_by_side(roots: list[Path], rounds: int) -> list[dict]:
    """bench/scale_rates.py on every size's cache, in a fresh process: rates compared in the same rounds."""
    t0, load_before = time.perf_counter(), os.getloadavg()[0]
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "scale_rates.py"), *map(str, roots),
                          "--rounds", str(rounds)], check=True, capture_output=True, text=True).stdout
    figures = json.loads(out.splitlines()[-1])
    print(json.dumps(figures), flush=True)
    return [{"rows": int(root.name.split("-")[1]), **f, "rounds": rounds, "measure_s": round(time.perf_counter() - t0, 1),
             "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)]} for root, f in zip(roots, figures)]


def provenance(argv) -> dict:
    """Which blitext was measured (an editable install can point at another checkout than this
    script's: run with PYTHONPATH=. to measure this one), its commit, and the command line."""
    import blitext

    package = Path(blitext.__file__).parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=package, capture_output=True, text=True).stdout.strip()

    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))
    return {"blitext": str(package), "commit": git("rev-parse", "--short", "HEAD") + ("+changes" if dirty else ""),
            "command": " ".join([*([f"PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else []),
                                 "python bench/scale.py", *(argv if argv is not None else sys.argv[1:])])}


def measure_all_inputs(work: Path, args) -> None:
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.inputs:
        figures = {"entries": n}
        for store in ("pairs", "sentences"):  # pairs_store and pformer_split parse and write, not reuse
            shutil.rmtree(work / "cache" / store, ignore_errors=True)
        env = {**os.environ, "BLITEXT_CACHE": str(work / "cache")}
        for reader in args.readers:
            line = subprocess.run([sys.executable, __file__, "--measure-inputs", str(n), "--reader", reader,
                                   "--workdir", str(work)], check=True, capture_output=True, text=True, env=env).stdout
            figures.update(json.loads(line.splitlines()[-1]))
        results.append(figures)
        print(json.dumps(figures), flush=True)
    name = "scale_inputs" if args.result == "scale" else args.result
    write_result(name, {**provenance(None), "note": args.note, "inputs": results})


if __name__ == "__main__":
    main()
