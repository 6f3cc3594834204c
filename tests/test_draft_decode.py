"""extract-features --decode draft: JPEGs decoded at a reduced scale that still covers the
encoder's input (blitext/data/images.py), recorded in the cache's producer."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from blitext.cache import FeatureCache
from blitext.cli.main import app
from blitext.data.images import DRAFT_DECODING, decode_image
from blitext.errors import BlitextError
from blitext.features.image import ExtractConfig, extract_features
from blitext.models.loading import load_vision_encoder


def photo(width: int, height: int, seed: int, format: str = "JPEG") -> bytes:
    """A smooth colour field with noise: JPEG-compressed as a photo is."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, width)[None, :, None] * np.linspace(0.3, 1, height)[:, None, None]
    pixels = np.clip(rng.uniform(40, 255, 3) * ramp + rng.normal(0, 12, (height, width, 3)), 0, 255)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format=format, quality=90)
    return out.getvalue()


def test_a_draft_decodes_jpegs_at_the_smallest_scale_still_covering_the_size():
    jpeg = photo(1600, 1200, 0)
    assert decode_image(jpeg, "a.jpg").size == (1600, 1200)
    assert decode_image(jpeg, "a.jpg", draft_size=(224, 224)).size == (400, 300)  # 1/4: 1/8 would be 200 x 150
    assert decode_image(jpeg, "a.jpg", draft_size=(500, 224)).size == (800, 600)  # each side covered
    assert decode_image(jpeg, "a.jpg", draft_size=(2000, 2000)).size == (1600, 1200)  # never upscaled
    assert decode_image(photo(1600, 1200, 0, "PNG"), "a.png", draft_size=(224, 224)).size == (1600, 1200)


def write_jpeg_folder(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    lines = []
    for i in range(n):
        (folder / f"p{i}.jpg").write_bytes(photo(640, 480, i))
        lines.append({"image": f"p{i}.jpg", "caption": f"picture {i}", "id": f"p{i}"})
    (folder / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def test_extract_features_decode_draft_is_recorded_and_close_to_full(tmp_path, vision_folders):
    data = write_jpeg_folder(tmp_path / "jpegs", 6)
    base = dict(data=str(data), vision_encoder=str(vision_folders["vit"]), batch_size=2, shard_size=4, num_workers=0)
    extract_features(ExtractConfig(out=str(tmp_path / "full"), **base))
    extract_features(ExtractConfig(out=str(tmp_path / "draft"), decode="draft", **base))
    full, draft = FeatureCache(tmp_path / "full"), FeatureCache(tmp_path / "draft")
    assert DRAFT_DECODING in draft.producer["decoding"] and DRAFT_DECODING not in full.producer["decoding"]
    encoder = load_vision_encoder(str(vision_folders["vit"]))
    least = encoder.preprocess.least_decoded_size
    for key in full.keys:
        jpeg = (data / f"{key}.jpg").read_bytes()
        with torch.inference_mode():  # the draft row is the encoder's output on the drafted image
            expected = encoder(encoder.preprocess(decode_image(jpeg, key, draft_size=least))[None])[0].numpy()
        np.testing.assert_allclose(draft[key].astype(np.float32), expected, atol=2e-3)
        a, b = full[key].astype(np.float32).ravel(), draft[key].astype(np.float32).ravel()
        assert not np.array_equal(a, b)
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.9


def test_decode_is_full_or_draft_and_images_only(tmp_path):
    with pytest.raises(BlitextError, match="--decode 'fast': expected full or draft"):
        ExtractConfig(decode="fast")
    result = CliRunner().invoke(app, ["extract-features", "--modality", "video", "--data", str(tmp_path),
                                      "--decode", "draft"])
    assert result.exit_code == 2 and "--decode applies to images" in result.output


def test_a_model_of_draft_features_decodes_image_files_the_same_way(tmp_path, vision_folders):
    """blitext.load's and generate's image files go through TrainedModel.draft_size."""
    from types import SimpleNamespace

    from blitext.evaluation.model import TrainedModel, _pil
    from blitext.features.image import producer

    encoder = load_vision_encoder(str(vision_folders["vit"]))
    model = TrainedModel.__new__(TrainedModel)  # only what draft_size reads: the adaptor's producer, the encoder
    model.encoder = encoder
    model.adapter = SimpleNamespace(features_producer=producer(encoder, "draft"))
    assert model.draft_size == encoder.preprocess.least_decoded_size
    (tmp_path / "a.jpg").write_bytes(photo(1600, 1200, 0))
    assert _pil(tmp_path / "a.jpg", model.draft_size).size < (1600, 1200)
    model.adapter = SimpleNamespace(features_producer=producer(encoder, "full"))
    assert model.draft_size is None and _pil(tmp_path / "a.jpg", model.draft_size).size == (1600, 1200)
