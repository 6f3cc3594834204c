"""Before the stages, for video: `blitext extract-features --modality video` - one feature per segment.

The same job as image extraction (extract.py) with videos as items: DataLoader workers decode
each video with PyAV at 25 fps and cut it into segments; the encoder turns every segment into
one vector; each video becomes a variable-length cache row (T_i, D), T_i <= 32, which the
reader returns zero-padded with a (B, T) mask. Batches never cross shards, so resumed and
multi-rank runs write the same bytes as one uninterrupted run. Launch on several GPUs or
CPU processes with `torchrun --nproc_per_node N --no-python blitext extract-features --modality video ...`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from blitext.atomic import check_out
from blitext.cache import CachePlan
from blitext.config import default_cache_root, provenance
from blitext.console import say
from blitext.data.video import decode_video
from blitext.distributed import run_distributed
from blitext.errors import BadInputError, BlitextError
from blitext.features.image import encoder_dtype, fill_cache, shard_batches, write_batches
from blitext.features.plan import PlanItems, plan_items
from blitext.models.registry import DEFAULT_VISION_ENCODER
from blitext.models.video import I3D_PREFIX, Segmenting, load_video_encoder

KIND = "video-features"


@dataclass
class VideoExtractConfig:
    data: str = "moving-shapes"           # caption JSON (LAVIS or VATEX) / video folder, or a prepared dataset name
    out: str | None = None                # cache folder; default <cache root>/features/<data>__<encoder>-video
    vision_encoder: str = DEFAULT_VISION_ENCODER  # i3d:PATH (paper: I3D rgb_imagenet.pt), or an image encoder per frame
    image_root: str | None = None         # where relative video paths start; default the annotation's folder
    fps: float = 25.0                     # videos are resampled to this rate (I3D's training rate)
    segment_frames: int = 64              # frames per segment (paper: I3D on 64-frame stacks)
    segment_stride: int = 64              # frames between segment starts (64: back to back)
    max_segments: int = 32                # paper: up to 32 segments per video; longer videos are sampled evenly
    frames_per_segment: int = 8           # image-encoder fallback: frames encoded per segment (8 of 64: ~3 fps)
    crop: int = 224                       # I3D: centre crop in pixels (paper/pytorch-i3d: 224)
    batch_size: int = 4                   # videos per decoded batch
    segment_batch: int = 16               # segments per encoder forward (I3D: 16 x 64 x 224^2 frames)
    shard_size: int = 256                 # videos per HDF5 shard; a kill loses at most one shard's work
    num_workers: int = 2                  # DataLoader decoding processes per rank
    dtype: str = "float16"                # stored dtype
    precision: str = "auto"               # encoder weights: auto = bf16 on GPU, fp32 on CPU
    device: str = "auto"
    limit: int | None = None              # only the first N videos (quick runs)

    def __post_init__(self) -> None:
        if self.shard_size % self.batch_size:
            raise BlitextError(f"shard_size {self.shard_size} must be a multiple of batch_size {self.batch_size} "
                               "(batches never cross shards, so resumed runs repeat the same batches)")
        for name in ("segment_frames", "segment_stride", "max_segments", "frames_per_segment", "segment_batch"):
            if getattr(self, name) < 1:
                raise BlitextError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.fps <= 0:
            raise BlitextError(f"fps must be positive, got {self.fps}")

    @property
    def segmenting(self) -> Segmenting:
        return Segmenting(float(self.fps), self.segment_frames, self.segment_stride, self.max_segments)


class DecodedVideos(Dataset):
    """Runs in DataLoader workers: (index, one input per segment or None, why it failed or None)."""

    def __init__(self, items: PlanItems, prepare, fps: float, size: tuple[int | None, int | None]):
        self.items, self.prepare, self.fps, self.size = items, prepare, fps, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            frames = decode_video(item.root, item.ref, self.fps, *self.size)  # (N, H, W, 3) uint8
            return i, self.prepare(frames), None
        except BadInputError as e:
            why = str(e)
            return i, None, why if why.startswith(item.ref) else f"{item.ref}: {why}"
        except Exception as e:  # a decoder bug on one file must not end a long run; it is recorded
            return i, None, f"{item.ref}: unexpected {type(e).__name__}: {e}"


def collate_videos(batch):
    ok = [(i, x) for i, x, _ in batch if x is not None]
    failed = [(i, why) for i, _, why in batch if why is not None]
    return [i for i, _ in ok], [x for _, x in ok], failed


def default_out(config: VideoExtractConfig) -> Path:
    slug = lambda s: re.sub(r"[^A-Za-z0-9._-]+", "-", Path(s).name if Path(s).exists() else s).strip("-")
    encoder = "i3d" if config.vision_encoder.startswith(I3D_PREFIX) else slug(config.vision_encoder)
    return default_cache_root() / "features" / f"{slug(config.data)}__{encoder}-video"


def extract_video_features(config: VideoExtractConfig) -> dict:
    """Run (or resume) one video extraction; returns the cache summary. Call under torchrun for several ranks."""
    check_out(config.out)
    return run_distributed(config.device, lambda device, info: _extract(config, device, info))


def _extract(config: VideoExtractConfig, device: str, info) -> dict:
    out = Path(config.out) if config.out else default_out(config)
    items = plan_items(config, "videos")
    encoder = load_video_encoder(config.vision_encoder, config.segmenting, config.frames_per_segment,
                                 config.crop, device).to(encoder_dtype(config.precision, device))
    say(f"extract-features: {len(items):,} videos -> {out} with {encoder.fingerprint} on {device}"
        + (f" ({info.world} ranks)" if info.world > 1 else ""))
    plan = CachePlan(out, KIND, encoder.producer(), items.keys, config.shard_size, config.dtype,
                     variable_length=True, provenance=provenance(config))

    return fill_cache(plan, info, lambda shards, warnings: _write_shards(
        plan, shards, items, encoder, config, device, warnings))


def _write_shards(plan, shards, items, encoder, config, device, warnings) -> dict:
    videos = DecodedVideos(items, encoder.preparer(), config.fps, encoder.decode_size())
    loader = DataLoader(videos, batch_sampler=shard_batches(plan, shards, config.batch_size),
                        collate_fn=collate_videos, num_workers=config.num_workers, persistent_workers=False)
    stored = getattr(torch, config.dtype)
    return write_batches(plan, shards, items, iter(loader), config.batch_size,
                         lambda inputs: encode_videos(encoder, inputs, config.segment_batch, device, stored),
                         warnings, "video")


def encode_videos(encoder, inputs: list[torch.Tensor], segment_batch: int, device: str, stored) -> list:
    """Each video's segments (T_i, ...) -> its (T_i, D) row, encoding `segment_batch` segments at a time
    across video boundaries (a batch of short clips fills the encoder as well as one long video)."""
    segments = torch.cat(inputs)                                        # (sum T_i, ...)
    feats = torch.cat([encoder(segments[j:j + segment_batch].to(device, non_blocking=True))
                       for j in range(0, len(segments), segment_batch)])  # (sum T_i, D)
    # cast on the device: numpy's fp32 -> fp16 cast is far slower (see extract.py)
    feats = feats.to(stored).cpu()
    return [row.numpy() for row in torch.split(feats, [len(x) for x in inputs])]
