"""blitext.load(run): the Python API captions and answers as `blitext generate` does, from paths,
PIL images or pixel tensors, in any batch size; stage-1 runs and bad inputs are one-line errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import blitext
from blitext.cli.main import app
from blitext.errors import BlitextError
from adapter_world import runs, world  # noqa: F401

FAST = dict(num_beams=2, max_new_tokens=4, min_new_tokens=1)


@pytest.fixture(scope="module")
def model(runs):  # noqa: F811
    return blitext.load(runs["s2"], device="cpu", batch_size=3)


def image_paths(world, n: int) -> list:  # noqa: F811
    return [world["root"] / "data" / "images" / f"{i}.png" for i in range(n)]


def test_captions_equal_the_generate_command_on_the_same_images(tmp_path, world, runs, model):  # noqa: F811
    paths = image_paths(world, 5)
    out = tmp_path / "captions.json"
    result = CliRunner().invoke(app, ["generate", "--adapter", str(runs["s2"]), "--images", *map(str, paths),
                                      "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    batched = model.caption(paths, **FAST)
    assert len(set(batched)) > 1, batched  # images get captions of their own: a misrouted one would show
    assert model.caption(paths) == [r["text"] for r in json.loads(out.read_text())]  # both at the run's settings
    one_at_a_time = blitext.load(runs["s2"], device="cpu", batch_size=1)
    assert one_at_a_time.caption(paths, **FAST) == batched


def test_paths_pil_images_and_pixel_tensors_give_the_same_caption(world, model):  # noqa: F811
    path = image_paths(world, 1)[0]
    pil = Image.open(path)
    pixels = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1)  # (3, H, W) uint8
    expected = model.caption(path, **FAST)
    assert isinstance(expected, str)
    black = torch.zeros_like(pixels)  # what [0, 1] floats read as 0-255 pixels would look like
    assert model.caption(black, **FAST) != expected  # so a wrong pixel scale would show
    assert model.caption(pil, **FAST) == expected
    assert model.caption(pixels, **FAST) == expected
    assert model.caption(pixels.float() / 255, **FAST) == expected
    assert model.caption(torch.stack([pixels, pixels]), **FAST) == [expected, expected]
    assert model.caption([str(path), pil], **FAST) == [expected, expected]


def test_answers_use_the_vqa_settings_and_equal_the_generate_command(tmp_path, world, runs, model):  # noqa: F811
    paths = image_paths(world, 2)
    out = tmp_path / "answers.json"
    result = CliRunner().invoke(app, ["generate", "--adapter", str(runs["s2"]), "--images", *map(str, paths),
                                      "--question", "what colour is it?", "--max-new-tokens", "3", "--device", "cpu",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    expected = [r["text"] for r in json.loads(out.read_text())]
    assert model.answer(paths, "what colour is it?", max_new_tokens=3) == expected
    assert model.answer(paths, ["what colour is it?"] * 2, max_new_tokens=3) == expected
    assert model.settings("vqa").prompt == "Question: {} Short answer:" and model.settings("vqa").num_beams == 5
    with pytest.raises(BlitextError, match="2 images but 3 questions"):
        model.answer(paths, ["a?", "b?", "c?"])


def test_mistakes_are_one_line_errors(world, runs, model):  # noqa: F811
    with pytest.raises(BlitextError, match="stage-1 adaptor trained without L_align"):
        blitext.load(runs["s1_plain"], device="cpu")
    with pytest.raises(BlitextError, match="no such image file"):
        model.caption("missing.png")
    with pytest.raises(BlitextError, match=r"\(3, H, W\)"):
        model.caption(torch.zeros(5, 8, 8))
    with pytest.raises(BlitextError, match="unknown decoding option 'beams'"):
        model.caption(image_paths(world, 1), beams=3)
    with pytest.raises(BlitextError, match="--settings 'coco'"):
        blitext.load(runs["s2"], device="cpu", settings="coco")
