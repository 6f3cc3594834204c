"""Videos in: decoding with PyAV at a fixed frame rate, cutting into segments, VATEX captions.

A video is referenced like an image (a path relative to a dataset root, in the same caption
files), so captions join to video features by id exactly as they do to image features.
Every way a video can be unusable (missing, empty, not a video, no video stream, no
decodable frame) becomes a `BadInputError` naming the file, so a run records it and goes on.

Segments follow I3D feature extraction for captioning (VATEX, docs/method.md#video-features):
the video is resampled to 25 fps and cut into stacks of 64 frames; a video yields at most 32
segments.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np

from blitext.data.images import _inside
from blitext.data.records import ImageRecord
from blitext.errors import BadInputError, BlitextError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


# ---------------------------------------------------------------- decoding

def video_path(root: Path, ref: str) -> Path:
    """`root/ref`; when missing, the same name with another video extension (VATEX ids carry
    none, and downloaders save .mp4, .mkv or .webm as YouTube serves them)."""
    path = _inside(Path(root), ref, ref)
    if path.is_file():
        return path
    for ext in VIDEO_EXTENSIONS:
        other = path.with_suffix(ext)
        if other.is_file():
            return other
    raise BadInputError(f"{ref}: missing file {path}")


def decode_video(root: Path, ref: str, fps: float = 25.0, short_side: int | None = None,
                 crop: int | None = None) -> np.ndarray:
    """All frames of `ref` resampled to `fps`, as (N, H, W, 3) uint8 RGB.

    Frames are scaled while decoding so their shorter side is `short_side` (FFmpeg's swscale,
    area filter), then centre-cropped to `crop` x `crop`: a long 720p video then costs 150 KB a
    frame, not 2.7 MB. Resampling takes, for each output time k / fps, the decoded frame whose
    timestamp is nearest (FFmpeg's fps filter does the same), so 30 fps becomes 25 fps by
    dropping frames and 20 fps by repeating some.
    """
    import av

    path = video_path(root, ref)
    if path.stat().st_size == 0:
        raise BadInputError(f"{ref}: empty file (0 bytes)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadInputError(f"{ref}: no video stream (audio or data only)")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or fps)
            frames = _resampled(container.decode(stream), rate, fps, lambda f: _to_array(f, short_side, crop))
    except av.FFmpegError as e:
        raise BadInputError(f"{ref}: cannot decode as video ({type(e).__name__}: {e.strerror or e})") from None
    if not frames:
        raise BadInputError(f"{ref}: no decodable video frame")
    return np.stack(frames)


def _resampled(decoded, source_rate: float, fps: float, convert) -> list[np.ndarray]:
    """Nearest-timestamp resampling of a frame stream; each source frame converted at most once."""
    out: list[np.ndarray] = []
    k, prev, t0 = 0, None, None
    for index, frame in enumerate(decoded):
        t = frame.time if frame.time is not None else index / source_rate
        t0 = t if t0 is None else t0
        current = (t - t0, _Lazy(frame, convert))
        if prev is not None:
            while k / fps < current[0]:  # output times between the two frames: the nearer one
                tau = k / fps
                out.append((prev if tau - prev[0] <= current[0] - tau else current)[1]())
                k += 1
        prev = current
    if prev is not None:  # the last frame lasts one source frame period
        while k / fps < prev[0] + 1.0 / source_rate - 1e-9:
            out.append(prev[1]())
            k += 1
    return out


class _Lazy:
    """A decoded frame converted on first use only: frames that resampling drops cost nothing."""

    __slots__ = ("frame", "convert", "value")

    def __init__(self, frame, convert):
        self.frame, self.convert, self.value = frame, convert, None

    def __call__(self) -> np.ndarray:
        if self.value is None:
            self.value, self.frame = self.convert(self.frame), None
        return self.value


def _to_array(frame, short_side: int | None, crop: int | None) -> np.ndarray:
    w, h = frame.width, frame.height
    if short_side:
        scale = short_side / min(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
    rgb = frame.to_ndarray(width=w, height=h, format="rgb24", interpolation="AREA")  # (H, W, 3)
    if crop:
        if min(rgb.shape[:2]) < crop:
            raise BadInputError(f"frame {rgb.shape[1]}x{rgb.shape[0]} is smaller than the crop {crop}")
        top, left = (rgb.shape[0] - crop) // 2, (rgb.shape[1] - crop) // 2
        rgb = rgb[top:top + crop, left:left + crop]
    return np.ascontiguousarray(rgb)


# ---------------------------------------------------------------- segments

def sample_evenly(n: int, k: int) -> np.ndarray:
    """k indices spread evenly over range(n), first and last included (all of them when n <= k)."""
    if n <= k:
        return np.arange(n)
    return np.round(np.linspace(0, n - 1, k)).astype(np.int64)


def segment_windows(n_frames: int, segment_frames: int = 64, stride: int = 64, max_segments: int = 32) -> np.ndarray:
    """(T, segment_frames) frame indices of each segment.

    Windows start every `stride` frames; the last one is moved back to end at the last frame, so
    the tail of the video is covered rather than dropped. A video shorter than one window gives
    one segment whose missing frames repeat the last frame. A video with more than
    `max_segments` windows keeps `max_segments` of them spread evenly over its whole length:
    captions describe the whole video, and truncating would drop its end (the same rule is used
    by import-features, so imported and extracted caches agree).
    """
    if n_frames < 1:
        raise BlitextError("a video needs at least one frame")
    last_start = max(n_frames - segment_frames, 0)
    starts = list(range(0, last_start + 1, stride))
    if starts[-1] != last_start:
        starts.append(last_start)
    starts = np.asarray(starts)[sample_evenly(len(starts), max_segments)]
    windows = starts[:, None] + np.arange(segment_frames)[None, :]   # (T, segment_frames)
    return np.minimum(windows, n_frames - 1)


def frames_per_window(windows: np.ndarray, k: int) -> np.ndarray:
    """(T, k): k frames spread evenly over each window (the image-encoder fallback's samples)."""
    return windows[:, sample_evenly(windows.shape[1], k)] if windows.shape[1] > k else windows


# ---------------------------------------------------------------- VATEX captions

def is_vatex(data) -> bool:
    """VATEX's caption JSON: a list of {"videoID", "enCap": [...], "chCap": [...]}."""
    return isinstance(data, list) and bool(data) and isinstance(data[0], dict) and "videoID" in data[0]


def read_vatex(path: Path, data: list) -> tuple[list[ImageRecord], int, int]:
    """English captions only; id = videoID; the video is `<videoID>.mp4` under the root
    (any other video extension is found at decode time, see `video_path`). Returns the records,
    the number of blank captions skipped and of entries without "enCap" (counted, as the other readers')."""
    records, seen, blank, no_caption = [], set(), 0, 0
    for row, entry in enumerate(data):
        where = f"{path} entry {row}"
        if not isinstance(entry, dict) or not isinstance(entry.get("videoID"), str) or not entry["videoID"].strip():
            raise BlitextError(f"{where}: expected {{\"videoID\": str, \"enCap\": [...]}}, got {str(entry)[:80]}")
        video_id = entry["videoID"].strip()
        if video_id in seen:
            raise BlitextError(f"{where}: videoID {video_id!r} is listed twice; VATEX lists each video once")
        seen.add(video_id)
        no_caption += "enCap" not in entry
        captions = entry.get("enCap", [])
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise BlitextError(f"{where}: \"enCap\" must be a list of strings, got {str(captions)[:80]}")
        if PurePosixPath(video_id).is_absolute() or ".." in PurePosixPath(video_id).parts:
            raise BlitextError(f"{where}: videoID {video_id!r} is a path leaving the dataset root; fix the file")
        kept = tuple(c.strip() for c in captions if c.strip())
        blank += len(captions) - len(kept)
        records.append(ImageRecord(video_id, f"{video_id}.mp4", kept))
    return records, blank, no_caption
