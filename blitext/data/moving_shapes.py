"""moving-shapes: a generated captioned video set, the embedded default for the video variant.

Each clip is a real H.264 .mp4 (PyAV) of one coloured shape crossing a grey background in one
direction, captioned "a red circle moves left". 64 x 64 px at 25 fps, 2 to 3.2 s long, so a
clip is one or two 64-frame segments: videos of unequal length, as the cache's masks expect.
Everything is drawn from a seeded generator, so a build is the same on every machine: colour,
shape, direction, size, speed, start position and length. The caption is only solvable from
motion and appearance together: the same shape and colour appear moving every way.

With an image encoder instead of I3D, extract with short segments (`--segment-frames 16
--segment-stride 16 --frames-per-segment 2`: 4-5 segments a clip): the fallback averages the
frames inside a segment, so a direction shows only in how the segments follow each other.

Written like the image sets: `videos/<split>/<i>.mp4` and LAVIS `captions_<split>.json`
(`[{"image": "videos/train/0.mp4", "caption": [...], "image_id": "train-0", ...}]`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from blitext.data.readers import write_lavis_json
from blitext.data.records import ImageRecord

SIZE = 64                      # frame width and height in pixels (even: H.264's 4:2:0 needs it)
FPS = 25                       # the rate I3D expects, so extraction resamples nothing
SPLITS = {"train": 300, "test": 60}  # clips per split: extract + train on 2 CPU cores in minutes
SEEDS = {"train": 0, "test": 1}      # different seeds: test clips are not copies of train clips
BACKGROUND = (200, 200, 200)
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "yellow": (240, 210, 20),
           "purple": (130, 40, 160), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) in image coordinates


def build_moving_shapes(_source: Path, out: Path, limit: int | None) -> dict:
    """Write both splits under `out`; `limit` caps the clips per split (the lowest indices)."""
    codec = _codec()
    counts = {}
    for split, n in SPLITS.items():
        rng = np.random.default_rng(SEEDS[split])
        clips = [_draw_plan(rng) for _ in range(n)]  # drawn in full, so --limit keeps a prefix of the same set
        (out / "videos" / split).mkdir(parents=True)
        records = []
        for i, clip in enumerate(clips[:limit] if limit else clips):
            ref = f"videos/{split}/{i}.mp4"
            write_mp4(out / ref, render(clip), codec)
            meta = {k: clip[k] for k in ("color", "shape", "direction")}
            meta["frames"] = clip["frames"]
            records.append(ImageRecord(f"{split}-{i}", ref, (caption(clip),), meta))
        write_lavis_json(out / f"captions_{split}.json", records)
        counts[split] = {"videos": len(records)}
    counts["codec"] = codec
    return counts


def caption(clip: dict) -> str:
    return f"a {clip['color']} {clip['shape']} moves {clip['direction']}"


def _draw_plan(rng: np.random.Generator) -> dict:
    """Every random choice of one clip; positions are of the shape's centre, in pixels."""
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    direction = str(rng.choice(list(DIRECTIONS)))
    frames = int(rng.integers(50, 81))                    # 2.0 to 3.2 s at 25 fps
    radius = int(rng.integers(7, 13))
    travel = float(rng.uniform(0.45, 0.7)) * SIZE         # how far it moves over the clip
    dx, dy = DIRECTIONS[direction]
    across = float(rng.uniform(radius + 2, SIZE - radius - 2))  # the coordinate that does not change
    begin = (SIZE - travel) / 2 + float(rng.uniform(-4, 4))     # centred path along the moving axis
    along = [begin + travel * t / (frames - 1) for t in range(frames)]
    if dx < 0 or dy < 0:
        along = [SIZE - a for a in along]
    centres = [(a, across) if dx else (across, a) for a in along]
    return {"color": colour, "shape": shape, "direction": direction, "frames": frames,
            "radius": radius, "centres": centres}


def render(clip: dict) -> np.ndarray:
    """(frames, 64, 64, 3) uint8 RGB."""
    out = np.empty((clip["frames"], SIZE, SIZE, 3), dtype=np.uint8)
    for t, (x, y) in enumerate(clip["centres"]):
        image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
        _draw_shape(ImageDraw.Draw(image), clip["shape"], x, y, clip["radius"], COLOURS[clip["color"]])
        out[t] = np.asarray(image)
    return out


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: int, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:  # pointing up whatever the direction: the shape's name must not depend on its motion
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)


def _codec() -> str:
    """H.264 when this FFmpeg build can write it (every player reads it), else MPEG-4 part 2."""
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_mp4(path: Path, frames: np.ndarray, codec: str = "libx264", fps: int = FPS) -> None:
    """(N, H, W, 3) uint8 RGB -> an .mp4 file; single-threaded so the same frames give the same bytes."""
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "fast"}  # near-lossless: colours stay nameable
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
