"""bench/scale.py's input readers (`--inputs N... [--readers ...]`), each measured at N entries in a
fresh process (measure_inputs; bench/scale.py runs one process per reader and size and writes
the figures to bench/results/scale_inputs.json, or --result).

The readers: a LAVIS caption JSON of N images (one caption each) through the pair reader in memory
(`pairs`), the same captions as a captions.jsonl (`pairs_jsonl`: read row by row, where the JSON is
loaded whole first), the JSON through the pair reader's store as train-adapter reads it
(`pairs_store`: parsed and written under <workdir>/cache/pairs/, then mapped; `pairs_mapped`: a
later process, or another rank, mapping those files), and a text file of N sentences through
read_sentences (what train-pformer and build-prompts hold), the same read and split as train-pformer
reads it (`pformer_split`: held-out sentences drawn, the rest seen through an index, written under
<workdir>/cache/sentences/ and then mapped; `pformer_split_mapped`: a later process, or another
rank, mapping those files), and build-prompts end to end on the caption JSON with a tiny random
P-Former (`build_prompts`: captions read, ids checked, [CLS] rows written to a prompt cache; the
P-Former trained once per --workdir for one step on conftest's tiny BERT and OPT), and
extract-features' plan of the caption JSON, no encoder (`extract_plan`: the items every rank holds,
parsed and written to the store; `extract_plan_mapped`: a later process mapping it; `worker_copied`
for both: what a forked DataLoader worker wrote itself after reading every item once, the pages its
reference counts copied): wall and CPU seconds per entry, and memory per entry, each in a fresh
process: `bytes` what the result holds (USS growth, after malloc_trim gave back what the reader
freed), `anon` the growth of the process's own memory (RssAnon: not the mapped files' pages),
`columns` what the pair reader's columns hold by their own count (Pairs.nbytes), `peak` the most the
process held while reading (the growth of the peak RSS, reset before the read). For `pairs_mapped`
also after one pass over every key, image id and text, and over train-adapter's group numbers
(Pairs.groups(), mapped from the store, a batch of rows gathered at a time as AdapterLoop.positives
reads them; `pairs_mapped_groups_mapped`: they were mapped, not computed), and for
`pformer_split_mapped` over every training id and sentence: `anon_after_pass` and `file_after_pass`
(RssFile: the mapped pages touched, page cache shared by a machine's ranks).
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from common import private_dirty_mb, uss_mb


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
    before, rss_before, anon_before = uss_mb(me), _reset_peak_rss(), _status_kb("RssAnon")
    t0, cpu0 = time.perf_counter(), time.process_time()
    held = read()  # held while its memory is measured
    # CPU time too: on a shared machine the wall time also counts the waits for a core
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    _return_free_memory()
    columns = {f"{reader}_columns_bytes_per_entry": round(held.nbytes() / n)} if hasattr(held, "nbytes") else {}
    figures = {f"{reader}_us_per_entry": round(1e6 * wall / n, 2), f"{reader}_cpu_us_per_entry": round(1e6 * cpu / n, 2),
               f"{reader}_bytes_per_entry": round((uss_mb(me) - before) * 2**20 / n), **columns,
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
        before = private_dirty_mb(os.getpid())
        for i in range(len(items)):
            item = items[i]
            item.key, item.root, item.ref  # noqa: B018  (what a worker reads of an item)
        os.write(write, str(private_dirty_mb(os.getpid()) - before).encode())
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
