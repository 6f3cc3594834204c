"""generate's --images: several paths after one --images, folders, globs of images or of shards."""
from __future__ import annotations

import pytest
from PIL import Image
from typer.testing import CliRunner

from blitext.cli.main import app
from blitext.errors import BlitextError
from blitext.evaluation import generate
from blitext.evaluation.generate import image_refs


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("b.png", "a.jpg", "c.png"):
        Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / name)
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def test_files_globs_and_folders_give_every_image_in_order(photos):
    assert [r.id for r in image_refs([str(photos / "b.png"), str(photos / "a.jpg")], None)] == ["b.png", "a.jpg"]
    assert [r.id for r in image_refs([str(photos / "*.png")], None)] == ["b.png", "c.png"]
    assert [r.id for r in image_refs([str(photos / "*.png"), str(photos / "a.jpg")], 2)] == ["b.png", "c.png"]
    assert sorted(r.id for r in image_refs([str(photos)], None)) == ["a", "b", "c"]


def test_a_glob_that_matches_nothing_or_more_than_images_is_one_line(photos):
    with pytest.raises(BlitextError, match="matches no files"):
        image_refs([str(photos / "*.webp")], None)
    with pytest.raises(BlitextError, match=r"\.tar"):
        image_refs([str(photos / "*")], None)
    with pytest.raises(BlitextError, match="no such file"):
        image_refs([str(photos / "missing.png")], None)


def test_paths_after_one_images_option_all_reach_generate(photos, monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(generate, "run_generate", lambda cfg: seen.append(cfg.images) or [])
    args = ["generate", "--adapter", str(tmp_path), "--images", str(photos / "b.png"), str(photos / "a.jpg"),
            str(photos / "c.png")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen == [[str(photos / "b.png"), str(photos / "a.jpg"), str(photos / "c.png")]]
