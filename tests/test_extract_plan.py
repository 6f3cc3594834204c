"""extract-features' plan from compact columns (plan.py) equals the plan it was before: items built
from read_image_set's records, each id once, in file order, then `limit` (plan_sha256 and resumed
caches depend on it)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blitext.cache.writer import plan_digest
from blitext.config import default_cache_root
from blitext.data.readers import read_image_set
from blitext.errors import BlitextError
from blitext.features.image import ExtractConfig
from blitext.features.plan import PlanItems, plan_items
from blitext.features.video import VideoExtractConfig


def old_plan_items(config) -> list[tuple[str, Path, str]]:
    """The plan as extract-features made it before plan.py: ImageRecords, a set of ids, a list."""
    path = Path(config.data)
    if not path.exists() and "*" not in config.data:
        path = default_cache_root() / "data" / config.data
    prepared = sorted(path.glob("captions*.json")) if path.is_dir() else []
    sets = [read_image_set(f, config.image_root) for f in prepared] or [
        read_image_set(config.data if "*" in config.data else path, config.image_root)]
    items, seen = [], set()
    for image_set in sets:
        for rec in image_set.records:
            if rec.id not in seen:
                seen.add(rec.id)
                items.append((rec.id, image_set.root, rec.image))
    return items[:config.limit] if config.limit else items


def as_tuples(items: PlanItems) -> list[tuple[str, Path, str]]:
    return [(it.key, it.root, it.ref) for it in items]


def assert_same_plan(config) -> PlanItems:
    old = [(key, Path(os.path.abspath(root)), ref) for key, root, ref in old_plan_items(config)]
    new = plan_items(config)
    assert [(k, Path(os.path.abspath(r)), ref) for k, r, ref in as_tuples(new)] == old
    assert list(new.keys) == [key for key, _, _ in old]
    assert plan_digest(new.keys) == plan_digest([key for key, _, _ in old])
    return new


def lavis(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"image": image, "caption": caption, "image_id": image_id}
                                for image_id, image, caption in rows]))
    return path


def test_repeated_ids_within_and_across_files_are_planned_once_at_their_first_place(tmp_path):
    folder = tmp_path / "lavis"
    lavis(folder / "captions_a.json", [("7", "i/7.jpg", "a"), ("2", "i/2.jpg", "b"), ("7", "i/7.jpg", "c"),
                                       ("5", "i/5.jpg", "d")])
    lavis(folder / "captions_b.json", [("9", "j/9.jpg", "e"), ("2", "i/2.jpg", "f"), ("1", "j/1.jpg", "g"),
                                       ("7", "i/7.jpg", "h")])
    items = assert_same_plan(ExtractConfig(data=str(folder)))
    assert list(items.keys) == ["7", "2", "5", "9", "1"]
    again = plan_items(ExtractConfig(data=str(folder)))  # mapped from the store the first call wrote
    assert as_tuples(again) == as_tuples(items)
    assert again.refs.ids.blob.__class__.__name__ == "mmap"


def test_prepared_dataset_by_name_with_splits_sharing_images(tmp_path):
    folder = default_cache_root() / "data" / "tiny-prepared"
    shared = [(f"im{i}", f"images/{i}.png", f"caption {i}") for i in range(6)]
    lavis(folder / "captions_train.json", shared[:4] + [("only-train", "images/t.png", "t")])
    lavis(folder / "captions_test.json", [shared[5], shared[1], ("only-test", "images/u.png", "u"), shared[3]])
    items = assert_same_plan(ExtractConfig(data="tiny-prepared"))
    assert list(items.keys) == ["im5", "im1", "only-test", "im3", "im0", "im2", "only-train"]  # test before train


def write_images(folder: Path, names: list[str]) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (1, 2, 3)).save(folder / name)


def test_image_folder_without_captions_is_planned_and_a_new_image_replans(tmp_path):
    folder = tmp_path / "pictures"
    write_images(folder, ["b.png", "a.jpg", "sub/c.png", "x.png", "x.jpg"])
    items = assert_same_plan(ExtractConfig(data=str(folder)))
    assert list(items.keys) == ["a", "b", "sub/c", "x.jpg", "x.png"]
    write_images(folder, ["sub/d.png"])  # the top folder's mtime does not change: no stale plan either
    assert list(assert_same_plan(ExtractConfig(data=str(folder))).keys) == ["a", "b", "sub/c", "sub/d", "x.jpg", "x.png"]


@pytest.mark.parametrize("limit", [1, 3, 100])
def test_limit_keeps_the_first_items_of_the_whole_plan(tmp_path, limit):
    folder = tmp_path / "lavis"
    lavis(folder / "captions_a.json", [("a", "a.jpg", "x"), ("b", "b.jpg", "x"), ("a", "a.jpg", "y")])
    lavis(folder / "captions_b.json", [("b", "b.jpg", "x"), ("c", "c.jpg", "x"), ("d", "d.jpg", "x")])
    items = assert_same_plan(ExtractConfig(data=str(folder), limit=limit))
    assert len(items) == min(limit, 4)


def test_tar_glob_and_video_captions_keep_their_plans(tmp_path):
    import io
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    for s, keys in enumerate([["k0", "k1"], ["k2", "k1"]]):
        with tarfile.open(shards / f"s-{s:05d}.tar", "w") as tar:
            for key in keys:
                for ext, data in (("jpg", b"jpeg"), ("txt", f"caption {key}".encode())):
                    info = tarfile.TarInfo(f"{key}-{s}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    assert_same_plan(ExtractConfig(data=f"{shards}/*.tar"))
    vatex = tmp_path / "vatex.json"
    vatex.write_text(json.dumps([{"videoID": f"v{i}", "enCap": [f"clip {i}"], "chCap": []} for i in (3, 1, 2)]))
    assert_same_plan(VideoExtractConfig(data=str(vatex)))


def test_an_input_listing_no_image_is_a_one_line_error(tmp_path):
    empty = lavis(tmp_path / "empty.json", [])
    with pytest.raises(BlitextError, match="lists no images"):
        plan_items(ExtractConfig(data=str(empty)))


def test_dry_run_key_length_comes_from_the_planned_keys(tmp_path):
    lavis(tmp_path / "d" / "captions.json", [("ab", "a.jpg", "x"), ("abcd", "b.jpg", "x"), ("\u00e9", "c.jpg", "x")])
    items = plan_items(ExtractConfig(data=str(tmp_path / "d" / "captions.json")))
    assert items.mean_key_bytes() == pytest.approx(np.mean([2, 4, 2]))
    assert plan_items(ExtractConfig(data=str(tmp_path / "d" / "captions.json"), limit=1)).mean_key_bytes() == 2
