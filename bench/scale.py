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
With --inputs N..., the readers of inputs instead: a LAVIS caption JSON of N images (one
caption each) through the pair reader in memory (`pairs`), the same captions as a captions.jsonl
(`pairs_jsonl`: read row by row, where the JSON is loaded whole first), the JSON through the pair
reader's store as train-adapter reads it (`pairs_store`: parsed and written under
<workdir>/cache/pairs/, then mapped; `pairs_mapped`: a later process, or another rank, mapping
those files), and a text file of N sentences through read_sentences (what train-pformer and
build-prompts hold), the same read and split as train-pformer reads it (`pformer_split`:
held-out sentences drawn, the rest seen through an index, written under <workdir>/cache/sentences/
and then mapped; `pformer_split_mapped`: a later process, or another rank, mapping those files),
and build-prompts end to end on the
caption JSON with a tiny random P-Former (`build_prompts`: captions read, ids checked, [CLS] rows
written to a prompt cache; the P-Former trained once per --workdir for one step on conftest's
tiny BERT and OPT), and extract-features' plan of the caption JSON, no encoder (`extract_plan`:
the items every rank holds, parsed and written to the store; `extract_plan_mapped`: a later
process mapping it; `worker_copied` for both: what a forked DataLoader worker wrote itself after
reading every item once, the pages its reference counts copied): wall and CPU seconds per entry, and memory per entry, each in a fresh
process: `bytes` what the result holds (USS growth, after malloc_trim gave back what the reader
freed), `anon` the growth of the process's own memory (RssAnon: not the mapped files' pages),
`columns` what the pair reader's columns hold by their own count (Pairs.nbytes), `peak` the most
the process held while reading (the growth of the peak RSS, reset before the read). For
`pairs_mapped` also after one pass over every key, image id and text, and over train-adapter's
group numbers (Pairs.groups(), mapped from the store, a batch of rows gathered at a time as
AdapterLoop.positives reads them; `pairs_mapped_groups_mapped`: they were mapped, not computed),
and for `pformer_split_mapped` over every training id and sentence: `anon_after_pass` and
`file_after_pass` (RssFile: the mapped pages touched, page cache shared by a machine's ranks).
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
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

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
    out = {"rss_imports_mb": me.memory_info().rss / 2**20, "uss_imports_mb": _uss(me)}
    t0 = time.perf_counter()
    cache = FeatureCache(root)
    out["open_s"] = time.perf_counter() - t0
    out["rss_open_mb"] = me.memory_info().rss / 2**20
    out["uss_open_mb"] = _uss(me)
    cache[cache.keys[0]]  # opens shard 0: what one opened shard costs this process
    out["uss_one_shard_open_mb"] = _uss(me) - out["uss_open_mb"]
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
    out["uss_after_reads_mb"] = _uss(me)
    out["private_dirty_after_reads_mb"] = _private_dirty(me.pid)
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
    uss = [round(_uss(w), 1) for w in workers]
    dirty = [round(_private_dirty(w.pid), 1) for w in workers]
    del loader
    return {"pass_rows": rows, "pass_rows_per_s": rows / seconds, "worker_uss_mb": uss, "worker_private_dirty_mb": dirty,
            "rss_parent_after_pass_mb": me.memory_info().rss / 2**20}


def _uss(process) -> float:
    return process.memory_full_info().uss / 2**20


def _private_dirty(pid: int) -> float:
    """Memory the process wrote itself (MB): its heap, and pages copied from its parent on write."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) / 1024
    return float("nan")


READERS = ("pairs", "pairs_jsonl", "pairs_store", "pairs_mapped", "sentences", "pformer_split", "pformer_split_mapped",
           "build_prompts", "extract_plan", "extract_plan_mapped")
MAPPED = {"pairs_mapped": lambda pairs: (pairs.keys, pairs.image_ids, pairs.texts, *_batches_of_groups(pairs)),
          "pformer_split_mapped": lambda held: (held.split.train_ids, held.split.train)}


GROUP_BATCH = 256  # rows of the group numbers read at a time, as a global batch is


def _batches_of_groups(pairs):
    """Each of the group numbers as AdapterLoop.positives reads them: a batch's rows gathered at a time."""
    return [(numbers[np.arange(start, min(start + GROUP_BATCH, len(numbers)))]
             for start in range(0, len(numbers), GROUP_BATCH)) for numbers in pairs.groups()]


def measure_inputs(folder: Path, n: int, reader: str) -> dict:
    """Run in a fresh process: time and memory per entry of one input reader at n entries."""
    import psutil

    from blitext.data.pairs import read_pairs
    from blitext.data.text import read_sentences

    captions, jsonl, text = folder / f"captions-{n}.json", folder / f"captions-{n}.jsonl", folder / f"sentences-{n}.txt"
    if not all(p.is_file() for p in (captions, jsonl, text)):
        rows = [{"image": f"images/COCO_train2014_{i:012d}.jpg", "image_id": f"COCO_train2014_{i:012d}",
                 "caption": f"a photo of thing number {i} on a table"} for i in range(n)]
        captions.write_text(json.dumps(rows))
        jsonl.write_text("".join(json.dumps({"image": r["image"], "id": r["image_id"], "caption": r["caption"]}) + "\n"
                                 for r in rows))
        text.write_text("".join(f"a photo of thing number {i} on a table\n" for i in range(n)))
    stored = lambda: read_pairs([str(captions)], str(folder), lambda image_id: True, accepts="bench")  # noqa: E731
    read = {"pairs": lambda: read_pairs([str(captions)], str(folder), lambda image_id: True),
            "pairs_jsonl": lambda: read_pairs([str(jsonl)], str(folder), lambda image_id: True),
            "pairs_store": stored, "pairs_mapped": stored,  # the first parses and writes, the second maps
            "sentences": lambda: read_sentences([str(text)]),
            # the first reads, splits and writes the store, the second maps it
            "pformer_split": lambda: _read_and_split(text), "pformer_split_mapped": lambda: _read_and_split(text),
            "build_prompts": lambda: _build_prompts(folder, captions),
            # the first plans (and writes the store), the second maps what the first wrote
            "extract_plan": lambda: _extract_plan(captions), "extract_plan_mapped": lambda: _extract_plan(captions)}[reader]
    if reader in ("pformer_split", "pformer_split_mapped", "build_prompts", "extract_plan", "extract_plan_mapped"):
        import blitext.features.image  # noqa: F401
        import blitext.pformer.prompts  # noqa: F401  (torch and transformers: imported before measuring)
    if reader == "build_prompts":
        _tiny_pformer(folder)  # trained before measuring
    me = psutil.Process()
    _return_free_memory()  # before as after: else the imports' spare heap, given back after, reads as negative growth
    before, rss_before, anon_before = _uss(me), _reset_peak_rss(), _status_kb("RssAnon")
    t0, cpu0 = time.perf_counter(), time.process_time()
    held = read()  # held while its memory is measured
    # CPU time too: on a shared machine the wall time also counts the waits for a core
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    _return_free_memory()
    columns = {f"{reader}_columns_bytes_per_entry": round(held.nbytes() / n)} if hasattr(held, "nbytes") else {}
    figures = {f"{reader}_us_per_entry": round(1e6 * wall / n, 2), f"{reader}_cpu_us_per_entry": round(1e6 * cpu / n, 2),
               f"{reader}_bytes_per_entry": round((_uss(me) - before) * 2**20 / n), **columns,
               f"{reader}_anon_bytes_per_entry": round((_status_kb("RssAnon") - anon_before) * 1024 / n, 1),
               f"{reader}_peak_bytes_per_entry": round((_status_kb("VmHWM") - rss_before) * 1024 / n)}
    if reader in MAPPED:
        if held.store is None:
            raise RuntimeError(f"{reader}: the reader did not map its columns (is the cache root writable?)")
        figures.update(_after_a_pass(reader, MAPPED[reader](held), n, anon_before))
        if reader == "pairs_mapped":
            figures[f"{reader}_groups_mapped"] = all(isinstance(g, np.memmap) for g in held.groups())
    if reader.startswith("extract_plan"):
        figures[f"{reader}_worker_copied_bytes_per_entry"] = round(_worker_copies(held) * 2**20 / n)
    return figures


def _extract_plan(captions: Path):
    """extract-features' items of the caption JSON (no encoder): what each rank holds while it extracts."""
    from blitext.features.image import ExtractConfig, plan_items

    return plan_items(ExtractConfig(data=str(captions)))


def _worker_copies(items) -> float:
    """MB a forked process (a DataLoader worker) wrote itself after reading every item once, as
    DecodedImages does: touching the parent's objects' reference counts copies their pages
    (pytorch#13246); pages of mapped files or numpy arrays stay shared."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        os.close(read)
        before = _private_dirty(os.getpid())
        for i in range(len(items)):
            item = items[i]
            item.key, item.root, item.ref  # noqa: B018  (what a worker reads of an item)
        os.write(write, str(_private_dirty(os.getpid()) - before).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        copied = float(f.read())
    os.waitpid(pid, 0)
    return copied


def _after_a_pass(reader: str, columns, n: int, anon_before: int) -> dict:
    """The mapped columns' memory after every string of `columns` was read once: the process's
    own (anonymous) memory, and the mapped file pages it touched (RssFile, the page cache that
    every rank of a machine shares)."""
    file_before = _status_kb("RssFile")
    for column in columns:
        for _ in column:
            pass
    _return_free_memory()
    return {f"{reader}_anon_after_pass_bytes_per_entry": round((_status_kb("RssAnon") - anon_before) * 1024 / n, 1),
            f"{reader}_file_after_pass_bytes_per_entry": round((_status_kb("RssFile") - file_before) * 1024 / n, 1)}


def _read_and_split(text: Path):
    """train-pformer's split as it reads it: read, split and written to the store by the first
    process, mapped by a later one (or in memory where the cache root cannot be written)."""
    from blitext.pformer.train import read_split

    split = read_split([str(text)], "error", 64, 0)
    columns = (split.train_ids.values, split.train.values, split.train.index)
    return SimpleNamespace(split=split, store=split.store, nbytes=lambda: sum(c.nbytes for c in columns))


def _build_prompts(folder: Path, captions: Path) -> dict:
    from blitext.pformer.prompts import BuildPromptsConfig, build_prompts

    out = folder / f"prompts-{captions.stem}"
    shutil.rmtree(out, ignore_errors=True)
    info = build_prompts(BuildPromptsConfig(pformer=str(_tiny_pformer(folder)), captions=[str(captions)],
                                            out=str(out), device="cpu"))
    shutil.rmtree(out)
    return info


def _tiny_pformer(folder: Path) -> Path:
    """A P-Former trained one step on conftest's tiny random BERT and OPT (made once per workdir)."""
    run = folder / "pformer"
    if (run / "final").is_dir():
        return run / "final"
    import torch

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import BERT_WORDS, make_bert_folder, make_llm_folder
    from blitext.pformer.train import PFormerConfig, train_pformer

    torch.manual_seed(0)
    bert, opt = make_bert_folder(folder / "bert"), make_llm_folder("opt", folder / "opt")
    words = [w for w in BERT_WORDS if w.isalpha() and w.islower()]
    text = folder / "pformer-text.txt"
    text.write_text("".join(f"{a} {b}\n" for a in words for b in words))
    train_pformer(PFormerConfig(text=[str(text)], out=str(run), llm=str(opt), text_encoder=str(bert), batch_size=4,
                                heldout=2, max_steps=1, warmup_steps=1, sample_every=1000, n_samples=1, device="cpu"))
    return run / "final"


def _return_free_memory() -> None:
    """What the reader freed (a whole-file json.load's objects) goes back to the system where the
    allocator can give it, so that USS growth is what the result holds, not the allocator's spare
    heap. Python's own arenas go back only when wholly free: what stays counts."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the USS growth then counts the spare heap too


def _reset_peak_rss() -> int:
    """Resets the kernel's peak RSS (VmHWM) to the current RSS; returns that (kB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


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
