"""Extraction throughput vs the bare encoder forward on the same batches.

    python bench/extract_speed.py [--images 320] [--batch-size 32] [--encoder efficientnet-lite0]

Goal (issue 2): extract-features images/s >= 0.9 x the bare forward's images/s. The bare
forward gets its inputs already decoded and preprocessed in memory; extract-features pays
for decoding (in DataLoader workers), fp16 conversion, HDF5 writes, checksums and the manifest.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

from blitext.data.prepare import prepare_dataset  # noqa: E402
from blitext.extract import ExtractConfig, extract_features, plan_items  # noqa: E402
from blitext.data.images import load_image  # noqa: E402
from blitext.models.loading import load_vision_encoder  # noqa: E402


def bare_forward_rate(config: ExtractConfig) -> float:
    encoder = load_vision_encoder(config.vision_encoder)
    items = plan_items(config)
    pixels = torch.stack([encoder.preprocess(load_image(it.root, it.ref)) for it in items])
    batches = pixels.split(config.batch_size)
    with torch.inference_mode():
        encoder(batches[0])  # warm-up, as extract-features' first batch also pays it
        t = time.perf_counter()
        for b in batches:
            encoder(b)
        return len(items) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--encoder", default="efficientnet-lite0")
    ap.add_argument("--repeats", type=int, default=2, help="alternate bare / full runs; best of each (shared CPUs are noisy)")
    args = ap.parse_args()
    data = prepare_dataset("easy-vqa", limit=args.images)
    bare_rates, full_rates = [], []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory(dir=Path(__file__).parent.parent / "cache") as tmp:
            config = ExtractConfig(data=str(data), out=str(Path(tmp) / "c"), vision_encoder=args.encoder,
                                   batch_size=args.batch_size, shard_size=args.batch_size * 4, limit=args.images)
            bare_rates.append(bare_forward_rate(config))
            t = time.perf_counter()
            summary = extract_features(config)
            full_rates.append(summary["rows"] / (time.perf_counter() - t))
    bare, full = max(bare_rates), max(full_rates)
    write_result("extract_speed", {
        "command": "python bench/extract_speed.py", "encoder": args.encoder, "images": summary["rows"],
        "batch_size": args.batch_size, "bare_forward_images_per_s": round(bare, 2),
        "extract_features_images_per_s": round(full, 2), "ratio": round(full / bare, 3), "goal": ">= 0.9",
        "all_bare": [round(x, 2) for x in bare_rates], "all_extract": [round(x, 2) for x in full_rates],
        "note": "extract-features time includes model loading, worker start-up, decoding, writing and the manifest",
    })


if __name__ == "__main__":
    main()
