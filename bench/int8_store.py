"""What the 8-bit feature store (extract-features --store int8) changes on the demo's cache: bytes
per row, the features' error against fp16, the read rate, and the demo's stage 2 trained on each.

    BLITEXT_CACHE=/tmp/democache2 PYTHONPATH=. python bench/int8_store.py --cells pformer baseline

Converts the demo's easy-VQA features (EfficientNet-Lite0, fp16) to an int8 copy under --work
(blitext.cache.convert_store: the same rows quantised, no encoder run), then, for
each cell, trains the demo's stage 2 (blitext.recipes.recipe.stage2_config) from the demo's finished
stage-1 run on the fp16 and on the int8 features, same seed, and compares the LM loss curves and the
greedy exact captions at the end (blitext.recipes.budget.caption_point). The stage-1 runs were trained
on fp16 features: stage 2 on int8 features meets int8 features for the first time.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from common import write_result

from blitext.adapter.image import train_adapter
from blitext.cache import FeatureCache, convert_store
from blitext.cache.verify import cache_info
from blitext.config import default_cache_root
from blitext.recipes.budget import caption_point
from blitext.recipes.demo import VARIANTS, DemoConfig, demo_work, pformer_run
from blitext.recipes.recipe import adapter_base, stage2_config, train_once
from blitext.training import read_metrics


def feature_error(fp16: FeatureCache, int8: FeatureCache) -> dict:
    """The int8 rows (dequantised) against the fp16 rows, over every key."""
    max_abs, abs_sum, count, err2, ref2, max_steps = 0.0, 0.0, 0, 0.0, 0.0, 0.0
    for key in fp16.keys:
        x, y = fp16[key].astype(np.float32), int8[key].astype(np.float32)
        e = np.abs(y - x)
        max_abs, abs_sum, count = max(max_abs, float(e.max())), abs_sum + float(e.sum()), count + e.size
        err2, ref2 = err2 + float((e ** 2).sum()), ref2 + float((x ** 2).sum())
        max_steps = max(max_steps, float(e.max()) / (float(np.abs(x).max()) / 127 or 1))
    return {"max_abs": max_abs, "mean_abs": abs_sum / count, "relative_l2": (err2 / ref2) ** 0.5,
            "max_abs_in_steps": max_steps, "mean_abs_value": float(np.mean([np.abs(fp16[k]).mean() for k in fp16.keys]))}


def read_rate(cache: FeatureCache, passes: int = 3) -> float:
    """Rows per second read by key, page cache warm, rows checked (the first pass is not timed)."""
    keys = list(cache.keys)
    cache.get_many(keys)
    start = time.perf_counter()
    for _ in range(passes):
        cache.get_many(keys)
    return passes * len(keys) / (time.perf_counter() - start)


def storage(root: Path) -> dict:
    info = cache_info(root)
    return {"store": info["store"], "rows": info["rows"], "row_shape": info["row_shape"],
            "bytes_on_disk": info["bytes_on_disk"], "bytes_per_row": info["bytes_per_row"],
            "raw_bytes": info["raw_bytes"], "shard_files": {p.name: p.stat().st_size for p in sorted(root.glob("shard-*.h5"))}}


def stage2(cell: str, features: Path, out: Path, seed: int, data: Path, prompts: Path, stage1: Path) -> Path:
    r = DemoConfig().recipe
    _, w2 = VARIANTS[cell]
    base = adapter_base(r, features, prompts, [str(data / "captions_train.json")], seed)
    train_once(out, lambda resume: train_adapter(stage2_config(r, base, w2, stage1, out, resume)))
    return out


def lm_curve(run: Path) -> list[float]:
    return [m["lm"] for m in read_metrics(run / "metrics.jsonl") if "lm" in m]


def compare_cell(cell: str, fp16: Path, int8: Path, work: Path, args) -> dict:
    demo = demo_work(DemoConfig())
    data = default_cache_root() / "data" / "easy-vqa-500" / "easy-vqa"
    prompts = default_cache_root() / "prompts" / f"easy-vqa-500__{pformer_run(DemoConfig()).name}"
    # fp16: the demo's own stage 2 (same recipe, seed and features) unless --retrain-fp16; a rerun
    # here reproduced its step 0 to the last digit (torch.use_deterministic_algorithms, as the demo)
    runs = {"fp16": demo / f"{cell}-stage2"} if not args.retrain_fp16 and args.train_only != "fp16" else {}
    runs.update({store: stage2(cell, feats, work / f"{cell}-stage2-{store}", args.seed, data, prompts,
                               demo / f"{cell}-stage1")
                 for store, feats in (("fp16", fp16), ("int8", int8))
                 if args.train_only in (None, store) and store not in runs})
    if args.train_only:
        return {}
    curves = {store: lm_curve(run) for store, run in runs.items()}
    diff = np.abs(np.array(curves["int8"]) - np.array(curves["fp16"]))
    # the noise floor: the fp16 run here against the demo's own stage 2 (same settings and seed)
    demo_curve = lm_curve(demo / f"{cell}-stage2")
    rerun = np.abs(np.array(curves["fp16"]) - np.array(demo_curve[:len(curves["fp16"])]))
    tail = lambda c: float(np.mean(c[-20:]))
    # each run captioned from its own features: what a user of that store gets
    captions = {store: caption_point(run, fp16 if store == "fp16" else int8, data, args.caption_images)
                for store, run in runs.items()}
    return {"stage1": str(demo / f"{cell}-stage1"), "runs": {k: str(v) for k, v in runs.items()},
            "lm_first": {k: c[0] for k, c in curves.items()}, "lm_last20_mean": {k: tail(c) for k, c in curves.items()},
            "lm_max_abs_diff": float(diff.max()), "lm_mean_abs_diff": float(diff.mean()),
            "fp16_vs_demo_lm_max_abs_diff": float(rerun.max()), "demo_lm_last20_mean": tail(demo_curve),
            "lm_every_25": {k: [round(v, 4) for v in c[::25]] + [round(c[-1], 4)] for k, c in curves.items()},
            "captions_final": captions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/int8bench"))
    ap.add_argument("--cells", nargs="*", default=["pformer"], choices=list(VARIANTS),
                    help="the demo's cells to train stage 2 of (none: only the storage and feature figures)")
    ap.add_argument("--retrain-fp16", action="store_true", help="train the fp16 stage 2 here too, not reuse the demo's")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--caption-images", type=int, default=100)  # the demo's
    ap.add_argument("--train-only", choices=["fp16", "int8"], help="only train this store's stage 2 (two processes "
                    "at once on a loaded machine); a run without it reuses both and compares them")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)  # as the demo runs
    fp16 = default_cache_root() / "features" / "easy-vqa-500__efficientnet-lite0"
    int8 = args.work / "features" / "easy-vqa-500__efficientnet-lite0-int8"
    if not (int8 / "manifest.json").is_file():
        convert_store(fp16, int8, "int8")
    if args.train_only:
        for cell in args.cells:
            compare_cell(cell, fp16, int8, args.work, args)
        return
    caches = {"fp16": FeatureCache(fp16), "int8": FeatureCache(int8)}
    result = {
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "features": {"fp16": str(fp16), "int8": str(int8)},
        "storage": {k: storage(Path(c.root)) for k, c in caches.items()},
        "feature_error": feature_error(caches["fp16"], caches["int8"]),
        "read_rows_per_s": {k: read_rate(c) for k, c in caches.items()},
        "load_average": os.getloadavg(),  # the read rates are only as steady as the machine was
        "note": "the stage-1 runs were trained on fp16 features; stage 2 is trained and captioned on each store",
        "cells": {},
    }
    write_result("int8_store", result)
    for cell in args.cells:
        result["cells"][cell] = compare_cell(cell, fp16, int8, args.work, args)
        write_result("int8_store", result)  # after each cell: a long run keeps what it measured


if __name__ == "__main__":
    main()
