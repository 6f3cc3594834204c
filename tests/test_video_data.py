"""Video data: the generated moving-shapes set, PyAV decoding at 25 fps (generated and real
Debian clips), segments, the VATEX caption reader, and import-features of .npy releases."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from blitext.cache import FeatureCache
from blitext.cache.verify import verify_cache
from blitext.data.moving_shapes import COLOURS, write_mp4
from blitext.data.prepare import prepare_dataset, unpack_debian_package
from blitext.data.readers import read_image_set
from blitext.data.video import decode_video, frames_per_window, segment_windows
from blitext.errors import BadInputError, BlitextError
from blitext.features.imported import ImportConfig, import_features

IMAGEIO_CLIPS = Path("usr/lib/python3/dist-packages/imageio/resources/images")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return prepare_dataset("moving-shapes", tmp_path_factory.mktemp("data"), limit=4)


# ---------------------------------------------------------------- moving-shapes

def test_moving_shapes_is_a_lavis_caption_set_of_real_mp4s(shapes):
    entries = json.loads((shapes / "captions_train.json").read_text())
    assert [e["image_id"] for e in entries] == ["train-0", "train-1", "train-2", "train-3"]
    assert all(e["image"] == f"videos/train/{i}.mp4" for i, e in enumerate(entries))
    assert len(read_image_set(shapes / "captions_test.json").records) == 4
    marker = json.loads((shapes / "prepared.json").read_text())
    assert marker["limit"] == 4 and marker["counts"]["train"] == {"videos": 4}
    for e in entries:
        (text,) = e["caption"]
        assert text == f"a {e['color']} {e['shape']} moves {e['direction']}"
        frames = decode_video(shapes, e["image"])              # written at 25 fps: nothing resampled
        assert frames.shape == (e["frames"], 64, 64, 3)
        _assert_colour_and_direction(frames, e["color"], e["direction"])


def _assert_colour_and_direction(frames: np.ndarray, colour: str, direction: str) -> None:
    """The shape's pixels have the caption's colour, and their centroid moves the caption's way."""
    target = np.array(COLOURS[colour], dtype=np.int32)
    centroids = []
    for frame in (frames[2], frames[-3]):
        mask = np.abs(frame.astype(np.int32) - target).max(-1) < 40
        assert mask.sum() > 40, f"no {colour} shape in the frame"
        ys, xs = np.nonzero(mask)
        centroids.append((xs.mean(), ys.mean()))
    (x0, y0), (x1, y1) = centroids
    moved = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}
    assert moved[direction] > 15 and max(v for k, v in moved.items() if k != direction) < 3


def test_moving_shapes_is_deterministic_and_limit_keeps_a_prefix(shapes, tmp_path):
    again = prepare_dataset("moving-shapes", tmp_path, limit=2)
    first = json.loads((shapes / "captions_train.json").read_text())
    assert json.loads((again / "captions_train.json").read_text()) == first[:2]
    assert (again / "videos/train/1.mp4").read_bytes() == (shapes / "videos/train/1.mp4").read_bytes()


# ---------------------------------------------------------------- decoding

def test_decoding_resamples_to_25_fps_by_nearest_timestamp(tmp_path):
    """A 10 fps clip whose frame j has brightness 10 * j: output k shows source frame round(k * 10 / 25)."""
    frames = np.stack([np.full((32, 32, 3), 10 * j, np.uint8) for j in range(20)])  # 2 s at 10 fps
    write_mp4(tmp_path / "slow.mp4", frames, fps=10)
    out = decode_video(tmp_path, "slow.mp4", fps=25.0)
    assert out.shape == (50, 32, 32, 3)
    shown = np.rint(out.reshape(50, -1).mean(1) / 10).astype(int)
    expected = [min(int(np.floor(k * 10 / 25 + 0.5 - 1e-9)), 19) for k in range(50)]  # ties go to the earlier frame
    assert shown.tolist() == expected
    fast = decode_video(tmp_path, "slow.mp4", fps=5.0)  # and down: every other frame
    assert np.rint(fast.reshape(len(fast), -1).mean(1) / 10).astype(int).tolist() == list(range(0, 20, 2))


def test_decoding_scales_and_centre_crops(tmp_path):
    frames = np.zeros((3, 40, 80, 3), np.uint8)
    frames[:, :, 20:60] = 255                                        # a white centre band
    write_mp4(tmp_path / "wide.mp4", frames, fps=25)
    out = decode_video(tmp_path, "wide.mp4", short_side=20, crop=20)  # 40x80 -> 20x40 -> centre 20x20
    assert out.shape == (3, 20, 20, 3) and out[:, 2:-2, 2:-2].min() > 200


@pytest.fixture(scope="session")
def debian_clips(tmp_path_factory) -> Path:
    """python3-imageio's real sample videos, unpacked with apt-get download + dpkg -x."""
    try:
        root = unpack_debian_package("python3-imageio", tmp_path_factory.mktemp("deb") / "python3-imageio")
    except BlitextError as e:
        pytest.skip(f"the real Debian clips could not be obtained, so this check did not run: {e}")
    return root / IMAGEIO_CLIPS


def test_real_debian_clip_decodes_at_25_fps(debian_clips):
    # realshort.mp4: 36 frames of 320x240 at 29.97 fps (1.2 s) -> 30 frames at 25 fps
    frames = decode_video(debian_clips, "realshort.mp4", fps=25.0, short_side=224, crop=224)
    assert frames.shape == (30, 224, 224, 3) and frames.dtype == np.uint8
    assert 20 < frames.mean() < 235 and frames.std() > 10          # a real picture, not a blank
    assert len(segment_windows(len(frames))) == 1


@pytest.mark.parametrize("name, content, reason", [
    ("missing.mp4", None, "missing file"),
    ("empty.mp4", b"", "empty file"),
    ("text.mp4", b"this is not a video at all" * 20, "cannot decode"),
])
def test_bad_videos_name_the_file_and_the_reason(tmp_path, name, content, reason):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(BadInputError, match=reason) as e:
        decode_video(tmp_path, name)
    assert str(e.value).startswith(name) and "\n" not in str(e.value)


# ---------------------------------------------------------------- segments

def test_segment_windows_cover_the_video_and_sample_long_ones_evenly():
    short = segment_windows(50)                        # shorter than one stack: last frame repeated
    assert short.shape == (1, 64) and short[0, 49:].tolist() == [49] * 15
    two = segment_windows(75)                          # the last window ends at the last frame
    assert two[:, 0].tolist() == [0, 11] and two[:, -1].tolist() == [63, 74]
    long = segment_windows(64 * 100)                   # 100 windows -> 32, first and last kept
    assert long.shape == (32, 64) and long[0, 0] == 0 and long[-1, -1] == 64 * 100 - 1
    assert np.all(np.diff(long[:, 0]) > 0)
    assert frames_per_window(two, 4).tolist() == [[0, 21, 42, 63], [11, 32, 53, 74]]


# ---------------------------------------------------------------- VATEX captions, video folders

def test_vatex_json_gives_english_captions_keyed_by_video_id(tmp_path):
    vatex = [{"videoID": "Ptf_2VRj-V0_000122_000132", "enCap": ["A man plays a guitar.", " "],
              "chCap": ["一个男人在弹吉他。"]},
             {"videoID": "abc_000001_000011", "enCap": ["Two dogs run."], "chCap": []}]
    (tmp_path / "vatex_training_v1.0.json").write_text(json.dumps(vatex, ensure_ascii=False), encoding="utf-8")
    records = read_image_set(tmp_path / "vatex_training_v1.0.json").records
    assert [(r.id, r.image, r.captions) for r in records] == [
        ("Ptf_2VRj-V0_000122_000132", "Ptf_2VRj-V0_000122_000132.mp4", ("A man plays a guitar.",)),
        ("abc_000001_000011", "abc_000001_000011.mp4", ("Two dogs run.",))]
    (tmp_path / "bad.json").write_text(json.dumps([{"videoID": "x", "enCap": "not a list"}]))
    with pytest.raises(BlitextError, match=r"bad.json entry 0: \"enCap\" must be a list"):
        read_image_set(tmp_path / "bad.json")


def test_a_folder_of_videos_reads_like_a_folder_of_images(shapes):
    records = read_image_set(shapes / "videos").records
    assert [r.id for r in records][:2] == ["test/0", "test/1"] and len(records) == 8


# ---------------------------------------------------------------- import-features

def write_npy_release(folder: Path) -> dict[str, np.ndarray]:
    """A VATEX-like release: good files in both layouts and one too long, plus every bad kind."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    good = {"vid_a": rng.integers(-64, 64, (1, 5, 16)) / 8, "vid_b": rng.integers(-64, 64, (7, 16)) / 8,
            "vid_long": rng.integers(-64, 64, (1, 40, 16)) / 8}
    for name, array in good.items():
        np.save(folder / f"{name}.npy", array.astype(np.float32))
    np.save(folder / "narrow.npy", np.zeros((1, 5, 8), np.float32))
    np.save(folder / "flat.npy", np.zeros(16, np.float32))
    np.save(folder / "empty.npy", np.zeros((1, 0, 16), np.float32))
    np.save(folder / "nan.npy", np.full((2, 16), np.nan, np.float32))
    np.save(folder / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (folder / "garbage.npy").write_text("not numpy")
    return good


def test_import_round_trip_reports_bad_files_and_resumes_without_duplicates(tmp_path):
    good = write_npy_release(tmp_path / "feats")
    cfg = ImportConfig(folder=str(tmp_path / "feats"), out=str(tmp_path / "cache"), shard_size=3)
    summary = import_features(cfg)
    reasons = {f["key"]: f["reason"] for f in summary["failures"]}
    assert set(reasons) == {"narrow", "flat", "empty", "nan", "pickled", "garbage"}
    assert all(reason.startswith(f"{key}.npy: ") for key, reason in reasons.items())
    assert "width 8" in reasons["narrow"] and "(16,)" in reasons["flat"] and "not a .npy" in reasons["garbage"]
    cache = FeatureCache(tmp_path / "cache")
    assert sorted(cache.keys) == ["vid_a", "vid_b", "vid_long"]
    np.testing.assert_array_equal(cache["vid_a"], good["vid_a"][0].astype(np.float16))
    np.testing.assert_array_equal(cache["vid_b"], good["vid_b"].astype(np.float16))
    picks = np.round(np.linspace(0, 39, 32)).astype(int)          # 40 segments -> 32, as extraction samples
    np.testing.assert_array_equal(cache["vid_long"], good["vid_long"][0, picks].astype(np.float16))
    batch, mask = cache.get_batch(["vid_a", "vid_long", "vid_b"])
    assert batch.shape == (3, 32, 16) and mask.sum(1).tolist() == [5, 32, 7]
    assert not batch[0, 5:].any() and not batch[2, 7:].any()      # zero padding under the mask
    assert cache.kind == "video-features" and cache.producer["source"] == "imported"
    assert cache.producer["encoder"] == "i3d-vatex" and cache.producer["folder"] == str((tmp_path / "feats").resolve())

    # a killed run: the last shard never finished; the rerun redoes only it, with no duplicate rows
    manifest = (tmp_path / "cache" / "manifest.json").read_text()
    for p in [tmp_path / "cache" / "manifest.json", *(tmp_path / "cache").glob("shard-00002.*")]:
        p.unlink()
    import_features(cfg)
    assert (tmp_path / "cache" / "manifest.json").read_text() == manifest
    assert verify_cache(tmp_path / "cache").ok


def test_import_cli_with_vatex_captions(tmp_path):
    from blitext.cli.main import app

    write_npy_release(tmp_path / "feats")
    captions = tmp_path / "vatex.json"
    captions.write_text(json.dumps([{"videoID": "vid_a", "enCap": ["a"]}, {"videoID": "gone", "enCap": ["b"]}]))
    out = tmp_path / "c"
    result = CliRunner().invoke(app, ["import-features", str(tmp_path / "feats"), "--captions", str(captions),
                                      "--out", str(out), "--encoder", "i3d-vatex-k600"])
    assert result.exit_code == 0, result.output
    cache = FeatureCache(out)
    assert cache.producer["encoder"] == "i3d-vatex-k600"
    assert cache.manifest["provenance"]["config"]["data"] == str(captions)  # where train-adapter finds captions
    result = CliRunner().invoke(app, ["import-features", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "nowhere" in result.output and "Traceback" not in result.output
