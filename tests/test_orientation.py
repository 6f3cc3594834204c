"""Issue 22: a photo stored sideways with an EXIF orientation is decoded upright, as a viewer
shows it (PIL's ImageOps.exif_transpose), and caches record it, so a cache made before (rows of
the sideways pixels) is told apart from one made now."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from blitext.cache import FeatureCache
from blitext.cache.manifest import producer_mismatch
from blitext.data.images import decode_image
from blitext.features.image import ExtractConfig, extract_features
from blitext.models.loading import load_vision_encoder

ORIENTATION = 0x0112  # the EXIF tag
# orientation -> how the stored pixels were turned from the upright photo (the tag says how to undo it)
STORED = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def upright_pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (30, 40, 3), dtype=np.uint8)  # landscape


def sideways_png(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    out = io.BytesIO()
    Image.fromarray(pixels).transpose(STORED[orientation]).save(out, format="PNG", exif=exif)
    return out.getvalue()


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_an_exif_rotated_photo_decodes_upright(orientation):
    pixels = upright_pixels()
    image = decode_image(sideways_png(pixels, orientation), "phone.png")
    assert image.size == (40, 30) and np.array_equal(np.asarray(image), pixels)


def test_an_exif_rotated_photo_caches_the_upright_rows(tmp_path, vision_folders):
    pixels = upright_pixels()
    (tmp_path / "imgs").mkdir()
    Image.fromarray(pixels).save(tmp_path / "imgs" / "upright.png")
    (tmp_path / "imgs" / "phone.png").write_bytes(sideways_png(pixels, 6))
    lines = [{"image": name, "caption": "a photo", "id": name[:-4]} for name in ("upright.png", "phone.png")]
    (tmp_path / "imgs" / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    extract_features(ExtractConfig(data=str(tmp_path / "imgs"), out=str(tmp_path / "c"),
                                   vision_encoder=str(vision_folders["vit"]), batch_size=2, num_workers=0,
                                   device="cpu"))
    cache = FeatureCache(tmp_path / "c")
    assert np.array_equal(cache["phone"], cache["upright"])
    assert cache.producer["decoding"] == load_vision_encoder(str(vision_folders["vit"])).producer()["decoding"]


def test_a_cache_made_before_orientation_was_applied_is_told_apart(vision_folders):
    now = load_vision_encoder(str(vision_folders["vit"])).producer()
    before = {k: v for k, v in now.items() if k != "decoding"}  # what caches made before recorded
    assert "exif" in now["decoding"]
    assert "decoding" in producer_mismatch(before, now)
