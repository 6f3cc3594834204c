"""bench/gpu_bench.py's extraction part: extract-features at steady state from webdataset .tar
shards against the bare ViT-g forward, with full and with draft decoding (issue 20, items 3 and 6).

The tars hold `IMAGES` entries in img2dataset's layout, made from 64 distinct 640 x 480 JPEG
photos-to-be (bench/extract_scale.py's) repeated: decoding costs what distinct photos cost,
and writing 10,000 JPEGs first would cost minutes of the device's time. As extract_scale.py
does, each decoding runs twice, on the first `SKIP` images and on all of them: start-up (workers,
the encoder's loading, the manifest) cancels out of the steady rate.
"""
from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import torch

from extract_scale import write_tars
from gpu_bench import DEVICE, SMOKE, assert_tells_apart, steady, vit_g_folder

IMAGES, SKIP = (96, 32) if SMOKE else (10_000, 500)
WORKERS = 2 if SMOKE else 14


def repeated_tars(folder: Path, images: int, per_tar: int = 1_000) -> Path:
    photos = folder.parent / "photos"
    write_tars(photos, 64, 64)
    with tarfile.open(next(photos.glob("*.tar"))) as tar:
        jpegs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    folder.mkdir(parents=True)
    for t in range(0, images, per_tar):
        with tarfile.open(folder / f"{t // per_tar:05d}.tar", "w") as tar:
            for i in range(t, min(t + per_tar, images)):
                for ext, data in (("jpg", jpegs[i % len(jpegs)]), ("txt", b"a photo"),
                                  ("json", f'{{"key": "{i:09d}"}}'.encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def steady_rate(tars: Path, encoder: Path, out: Path, decode: str) -> dict:
    from blitext.features.image import ExtractConfig, extract_features

    def run(limit: int | None, name: str) -> tuple[float, dict]:
        t = time.perf_counter()
        summary = extract_features(ExtractConfig(data=str(tars), out=str(out / name), vision_encoder=str(encoder),
                                                 batch_size=16 if SMOKE else 256, shard_size=256 if SMOKE else 1024,
                                                 num_workers=WORKERS, device=DEVICE, decode=decode, limit=limit))
        return time.perf_counter() - t, summary["timing"]

    first_s, _ = run(SKIP, f"{decode}-first")
    all_s, timing = run(None, f"{decode}-all")
    rate = (IMAGES - SKIP) / (all_s - first_s) if all_s > first_s else None
    return {"images_per_s": rate and round(rate, 1), "first_wall_s": round(first_s, 1), "all_wall_s": round(all_s, 1),
            "timing_s": {k: round(v, 2) for k, v in timing.items()}}


def decode_alone(tars: Path, preprocess, decode: str) -> float:
    """Images/s of the same DataLoader (workers decoding, batches as the encoder gets them) with no encoder."""
    from dataclasses import replace

    from torch.utils.data import DataLoader

    from blitext.features.image import ExtractConfig, collate_decoded, decoded_images, plan_items

    config = ExtractConfig(data=str(tars))
    loader = DataLoader(decoded_images(plan_items(config), preprocess, replace(config, decode=decode)),
                        batch_size=256, collate_fn=collate_decoded, num_workers=WORKERS)
    t = time.perf_counter()
    count = sum(len(ok) for ok, _, _ in loader)
    return count / (time.perf_counter() - t)


def write_alone(root: Path) -> dict:
    """Writing alone (fp16 rows of ViT-g's shape through ShardWriter) and the disk's plain write speed."""
    import subprocess

    import numpy as np

    from blitext.cache import CachePlan, ShardWriter
    from blitext.cache.writer import start_or_resume

    rows = 16 if SMOKE else 512
    plan = CachePlan(root / "write-test", "image-features", {"encoder": "bench"}, [str(i) for i in range(rows)],
                     rows, "float16")
    start_or_resume(plan)
    block = np.random.default_rng(0).standard_normal((64, 257, 1408)).astype(np.float32)
    t = time.perf_counter()
    with ShardWriter(plan, 0) as writer:
        for start in range(0, rows, 64):
            writer.add([str(i) for i in range(start, min(start + 64, rows))], block[:min(64, rows - start)])
    write = rows / (time.perf_counter() - t)
    dd = subprocess.run(["dd", "if=/dev/zero", f"of={root / 'dd.bin'}", "bs=1M", "count=1024", "conv=fsync"],
                        capture_output=True, text=True).stderr.strip().splitlines()[-1:]
    return {"shard_write_rows_per_s": round(write, 1), "row_bytes_fp16": 257 * 1408 * 2,
            "disk_dd_1gib_fsync": dd[0] if dd else None}


def extraction(root: Path) -> dict:
    from blitext.models.loading import load_vision_encoder

    folder = vit_g_folder(root)
    encoder = load_vision_encoder(str(folder), device=DEVICE).to(torch.bfloat16)
    pixels = torch.randn(8 if SMOKE else 256, 3, 224, 224, device=DEVICE, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert_tells_apart(encoder(pixels[:2]), "the random ViT-g")
        bare = len(pixels) / steady(lambda: encoder(pixels), steps=3 if SMOKE else 20, warmup=1 if SMOKE else 3)
    tars = repeated_tars(root / "tars", IMAGES)
    out = {"vit_g_bare_forward_images_per_s": round(bare, 1),
           "extract_note": f"{IMAGES:,} 640x480 JPEGs in .tar shards (64 distinct photos), {WORKERS} decoding workers, "
                           f"batch 256, fp16 rows; the steady rate after the first {SKIP}"}
    for decode in ("full", "draft"):
        run = steady_rate(tars, folder, root, decode)
        out[f"extract_{decode}"] = {**run, "decode_alone_images_per_s": round(decode_alone(tars, encoder.preprocess, decode), 1),
                                    "vs_bare": run["images_per_s"] and round(run["images_per_s"] / bare, 3)}
    return {**out, **write_alone(root)}
