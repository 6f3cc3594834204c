"""What extract-features --decode draft buys and costs: decoding rate and feature agreement.

    PYTHONPATH=. python bench/decode_draft.py [--images 64] [--rounds 3] [--note ...]

For JPEG photos-to-be (bench/extract_scale.py's: smooth colour fields plus noise) at 640 x 480
(COCO's usual size) and 1600 x 1200, one core:
- the CPU time of reading, decoding and preprocessing an image as extract-features' workers do
  (DecodedImages), with full and with draft decoding, alternated over `--rounds` rounds (the
  best round); beside them, full decoding as workers did before commit 0af5062, scaling and
  normalising to float32 themselves (`full_floats`), and what normalising costs the encoder's
  process now, per image of a batch of 32 on this CPU (on a GPU it runs on the GPU);
- the embedded encoder's features of the two decodings: cosine similarity per image (min and
  mean over the images' whole token grids).
Writes bench/results/decode_draft.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import git_commit, write_result  # noqa: E402
from extract_scale import write_tars  # noqa: E402

SIZES = ((640, 480), (1600, 1200))


def images_of(folder: Path, n: int, size: tuple[int, int]) -> Path:
    """n JPEGs of `size`: extract_scale's tar of photos, resized (the tar reader is extract-features' own)."""
    from PIL import Image

    write_tars(folder, n, n)
    if size == (640, 480):
        return folder
    import io
    import tarfile

    tar_path = next(folder.glob("*.tar"))
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for member, data in members:
            if member.name.endswith(".jpg"):
                out = io.BytesIO()
                Image.open(io.BytesIO(data)).resize(size, Image.BICUBIC).save(out, format="JPEG", quality=90)
                data = out.getvalue()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return folder


def measure(folder: Path, rounds: int) -> dict:
    import torch

    from blitext.allocator import keep_freed_memory
    from blitext.data.images import load_image
    from blitext.features.image import ExtractConfig, decoded_images, plan_items
    from blitext.models.loading import load_vision_encoder

    torch.set_num_threads(1)
    keep_freed_memory()  # as extract-features' ranks and their forked workers run on a CPU
    config = ExtractConfig(data=str(folder))
    items = plan_items(config)
    encoder = load_vision_encoder(config.vision_encoder)
    decoded = {way: decoded_images(items, encoder.preprocess, replace(config, decode=way)) for way in ("full", "draft")}
    batch = torch.stack([decoded["full"][i][1] for i in range(min(32, len(items)))])
    ways = {"full": decoded["full"].__getitem__, "draft": decoded["draft"].__getitem__,
            "full_floats": lambda i: encoder.preprocess(load_image(items[i].root, items[i].ref, config.max_pixels)),
            "normalise": lambda i: encoder.preprocess.normalise(batch) if i % len(batch) == 0 else None}
    seconds = {way: [] for way in ways}
    for _ in range(rounds):
        for way, work in ways.items():
            t = time.process_time()
            for i in range(len(items)):
                work(i)
            seconds[way].append((time.process_time() - t) / len(items))
    pixels = {way: torch.stack([d[i][1] for i in range(len(items))]) for way, d in decoded.items()}
    with torch.inference_mode():
        full, draft = (encoder(encoder.preprocess.normalise(pixels[way])).flatten(1) for way in ("full", "draft"))
    cosine = torch.nn.functional.cosine_similarity(full, draft).numpy()
    return {"images": len(items), **{f"{way}_ms_per_image": round(1000 * min(s), 2) for way, s in seconds.items()},
            "speedup": round(min(seconds["full"]) / min(seconds["draft"]), 2),
            "uint8_speedup": round(min(seconds["full_floats"]) / min(seconds["full"]), 2),
            "feature_cosine_min": round(float(cosine.min()), 4), "feature_cosine_mean": round(float(cosine.mean()), 4)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    args = ap.parse_args(argv)
    commit = git_commit()
    with tempfile.TemporaryDirectory(prefix="blitext-decode-draft-") as tmp:
        figures = {f"{w}x{h}": measure(images_of(Path(tmp) / f"{w}x{h}", args.images, (w, h)), args.rounds)
                   for w, h in SIZES}
    write_result("decode_draft", {"commit": commit, "command": " ".join(["python bench/decode_draft.py", *(argv or sys.argv[1:])]),
                                  "note": args.note, "encoder": "the embedded default (efficientnet-lite0)",
                                  "figures": figures})


if __name__ == "__main__":
    main()
