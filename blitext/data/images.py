"""Read image bytes (plain files or tar-shard members) and decode them to loaded RGB images.

Every way an image can be unusable (missing, empty, not an image, truncated, a decompression
bomb) becomes a `BadInputError` naming the file, so a run records it and moves on. Odd but
valid images (greyscale, transparency, CMYK, 16-bit, float, animated) are converted to RGB
the way a person would see them: turned upright by their EXIF orientation (phone photos are
mostly stored sideways), transparency over white, 16-bit scaled rather than clipped, the first
frame of an animation.

Nothing here mutates PIL's process-wide settings (MAX_IMAGE_PIXELS, LOAD_TRUNCATED_IMAGES):
DataLoader workers and other callers in the same process must not see them change.
"""
from __future__ import annotations

import io
import os
import tarfile
import threading
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from blitext.errors import BadInputError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default limit (about 9459 x 9459)
# What every image-feature cache records of decoding (VisionEncoder.producer): caches made before
# orientation was applied lack it, so their rows (of sideways photos) are told apart.
DECODING = "exif orientation applied (PIL ImageOps.exif_transpose)"
# extract-features --decode draft: what its caches record beside DECODING
DRAFT_DECODING = "JPEGs decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) where still at least the resize's size"
ORIENTATION = 0x0112  # the EXIF tag; 1 (or none): stored upright

# (pid, tar path) -> (open TarFile, member name -> TarInfo, lock). The pid is in the key
# because DataLoader workers fork: a handle inherited from the parent shares its file
# offset with the parent and siblings, so each process opens its own.
_TAR_CACHE: dict[tuple[int, str], tuple[tarfile.TarFile, dict[str, tarfile.TarInfo], threading.Lock]] = {}
_TAR_CACHE_LOCK = threading.Lock()


def _fresh_lock_after_fork() -> None:
    # A fork while another thread held the lock would leave the child's copy locked forever.
    global _TAR_CACHE_LOCK
    _TAR_CACHE_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_fresh_lock_after_fork)


# ---------------------------------------------------------------- bytes

def read_image_bytes(root: Path, ref: str) -> bytes:
    """The raw bytes of `ref` ("images/0.png" or "shard.tar#0001.jpg") under `root`."""
    root = Path(root)
    tar_part, sep, member = ref.partition("#")
    if sep and tar_part.endswith(".tar"):
        return _read_tar_member(root, ref, _inside(root, tar_part, ref), member)
    path = _inside(root, ref, ref)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadInputError(f"{ref}: missing file {path}") from None
    except IsADirectoryError:
        raise BadInputError(f"{ref}: {path} is a folder, not an image file") from None
    except OSError as e:
        raise BadInputError(f"{ref}: cannot read {path} ({e.strerror})") from None


def _inside(root: Path, relative: str, ref: str) -> Path:
    """Refuse absolute and '..' references here too: readers check, but refs can come from anywhere."""
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts:
        raise BadInputError(f"{ref}: image reference must be relative to the dataset root {root} without '..'")
    return root / pure


def _read_tar_member(root: Path, ref: str, tar_path: Path, member: str) -> bytes:
    tar, index, lock = _open_tar(tar_path, ref)
    info = index.get(member)
    if info is None:
        raise BadInputError(f"{ref}: missing member {member!r} in {tar_path}")
    with lock:  # one TarFile shares one file offset; threads must take turns
        try:
            return tar.extractfile(info).read()
        except (tarfile.TarError, OSError) as e:
            raise BadInputError(f"{ref}: cannot read member {member!r} of {tar_path} ({e})") from None


def _open_tar(tar_path: Path, ref: str) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo], threading.Lock]:
    key = (os.getpid(), str(tar_path))
    with _TAR_CACHE_LOCK:
        cached = _TAR_CACHE.get(key)
        if cached is not None:
            return cached
        if not tar_path.is_file():
            raise BadInputError(f"{ref}: missing file {tar_path}")
        try:
            tar = tarfile.open(tar_path)
            # A dict index: TarFile.getmember is a linear scan, too slow for 10k-member shards.
            index = {m.name: m for m in tar.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError) as e:
            raise BadInputError(f"{ref}: {tar_path} is not a readable tar file ({e})") from None
        _TAR_CACHE[key] = cached = (tar, index, threading.Lock())
        return cached


def close_tar_cache() -> None:
    """Close this process's open shard handles (tests, or before a long idle period)."""
    with _TAR_CACHE_LOCK:
        for (pid, _path), (tar, _index, _lock) in list(_TAR_CACHE.items()):
            if pid == os.getpid():
                tar.close()
        _TAR_CACHE.clear()


# ---------------------------------------------------------------- decoding

def decode_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_size: tuple[int, int] | None = None) -> Image.Image:
    """A fully loaded RGB image, or BadInputError saying why `name` cannot be used. `draft_size`
    (w, h): a JPEG is decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale that still covers it
    (DRAFT_DECODING): libjpeg skips most of the work of the pixels a resize would drop."""
    if len(data) == 0:
        raise BadInputError(f"{name}: empty file (0 bytes)")
    image = _open_header(data, name)
    width, height = image.size
    if width * height > max_pixels:
        raise BadInputError(f"{name}: decompression bomb refused: {width}x{height} = {width * height:,} pixels "
                            f"is over the limit of {max_pixels:,}; raise max_pixels if the image is genuine")
    try:
        if draft_size and image.format == "JPEG":
            image.draft(None, draft_size)  # the mode is left to to_rgb, as for a full decode
        image.load()  # the first frame only, for animated GIF/PNG/WebP
        return to_rgb(image, name)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadInputError(f"{name}: truncated or corrupt image ({image.format}: {e})") from None


def load_image(root: Path, ref: str, max_pixels: int = DEFAULT_MAX_PIXELS,
               draft_size: tuple[int, int] | None = None) -> Image.Image:
    return decode_image(read_image_bytes(root, ref), ref, max_pixels, draft_size)


def _open_header(data: bytes, name: str) -> Image.Image:
    """Image.open reads only the header, so the size is known before any pixel is decoded."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        # PIL refuses sizes over twice its global limit inside open(), before our own check.
        raise BadInputError(f"{name}: decompression bomb refused ({e})") from None
    except UnidentifiedImageError:
        raise BadInputError(f"{name}: not an image (no known image format; {len(data):,} bytes "
                            f"starting {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadInputError(f"{name}: corrupt image header ({e})") from None


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Convert any PIL mode to RGB as it would be displayed; always returns a new image."""
    if image.getexif().get(ORIENTATION, 1) != 1:  # the check alone: most images need no copy
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in image.info):
        return _over_white(image.convert("RGBA"))
    if mode.startswith("I;16") or mode == "I":
        return _integer_to_rgb(image)
    if mode == "F":
        return _float_to_rgb(image)
    try:
        return image.convert("RGB")  # RGB (a copy, detached from the file), L, 1, P, CMYK, YCbCr, RGBX
    except ValueError as e:
        raise BadInputError(f"{name}: unsupported image mode {mode} ({e})") from None


def _over_white(rgba: Image.Image) -> Image.Image:
    # Transparent pixels of stamps and logos are usually black underneath; a viewer shows white.
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _integer_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (values.size and values.min() >= 0 and values.max() <= 65535):
        # 16-bit data (PNG/TIFF): 65535 -> 255, 257 -> 1; clipping would make most pixels white.
        scaled = values / 257.0
    else:
        scaled = _stretch(values)
    return _grey_array_to_rgb(scaled)


def _float_to_rgb(image: Image.Image) -> Image.Image:
    values = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    # Float images are conventionally in [0, 1]; anything else is stretched to its own range.
    in_unit_range = values.size and values.min() >= 0.0 and values.max() <= 1.0
    return _grey_array_to_rgb(values * 255.0 if in_unit_range else _stretch(values))


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    return (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)


def _grey_array_to_rgb(values: np.ndarray) -> Image.Image:
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")  # 2-D uint8 -> mode L
