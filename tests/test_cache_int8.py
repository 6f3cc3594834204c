"""The 8-bit feature store (issue 20, item 4): `extract-features --store int8` writes each row as
int8 with a float32 scale per row; readers dequantise, checks and refusals work as for fp16."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import blitext.cache.writer
from blitext.cache import CachePlan, FeatureCache, ShardWriter, convert_store, finalize, pending_shards, start_or_resume
from blitext.cache.manifest import RUN, shard_name
from blitext.cache.quantise import quantise
from blitext.cache.verify import cache_info, verify_cache
from blitext.cli.main import app
from blitext.errors import BlitextError
from conftest import make_vision_folder
from test_extract import write_image_folder
from test_faults import chunk_offsets, flip_byte, one_line_error

PRODUCER = {"encoder": "enc", "fingerprint": "enc@0123"}


def rows_of(n: int, shape=(16, 64), seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # rows of unlike magnitudes (a per-row scale follows each), one all zeros
    rows = {f"img-{i}": (rng.standard_normal(shape) * 10.0 ** (i % 3 - 1)).astype(np.float32) for i in range(n)}
    rows["img-0"][:] = 0
    return rows


def build(root: Path, rows: dict[str, np.ndarray], store: str | None = "int8", dtype: str = "float16",
          shard_size: int = 3) -> dict:
    plan = CachePlan(root, "image-features", PRODUCER, list(rows), shard_size, dtype, store=store)
    start_or_resume(plan)
    for s in pending_shards(plan):
        keys = plan.keys[plan.shard_range(s).start:plan.shard_range(s).stop]
        with ShardWriter(plan, s) as w:
            w.add(keys, np.stack([rows[k] for k in keys]))
    return finalize(plan)


def scale_of(row: np.ndarray) -> float:
    return float(np.abs(row).max()) / 127


def test_round_trip_error_is_at_most_half_a_step(tmp_path):
    rows = rows_of(7)
    manifest = build(tmp_path / "c32", rows, dtype="float32")  # read back in float32: int8's error alone
    assert manifest["store"] == "int8" and manifest["dtype"] == "float32"
    cache = FeatureCache(tmp_path / "c32")
    for key, row in rows.items():
        got = cache[key]
        assert got.dtype == np.float32 and got.shape == row.shape
        assert np.abs(got - row).max() <= scale_of(row) / 2 * (1 + 1e-6), key
    assert not cache["img-0"].any()  # an all-zero row (scale 0) reads back as zeros

    build(tmp_path / "c16", rows)  # read back in fp16, as trainers get: plus fp16's own rounding
    cache = FeatureCache(tmp_path / "c16")
    for key, row in rows.items():
        got = cache[key].astype(np.float32)
        fp16_half_ulp = np.spacing(np.abs(row).astype(np.float16)).astype(np.float32) / 2
        assert (np.abs(got - row) <= scale_of(row) / 2 + fp16_half_ulp + 1e-7).all(), key
    batch, mask = cache.get_batch(["img-4", "img-1"])  # what trainers see: as an fp16 cache gives
    assert batch.dtype == torch.float16 and batch.shape == (2, 16, 64) and mask is None
    assert torch.equal(batch[0], torch.from_numpy(cache["img-4"]))  # the map's path equals the first read's
    with h5py.File(tmp_path / "c16" / shard_name(0)) as f:
        assert f["data"].dtype == np.int8 and f["data"].fletcher32 and f["data"].chunks == (1, 16, 64)
        assert f["scale"].dtype == np.float32 and f["scale"].fletcher32 and f["scale"].shape == (3,)
        q, scale = quantise(np.stack([rows[f"img-{i}"] for i in range(3)]))
        assert np.array_equal(f["data"][:], q) and np.array_equal(f["scale"][:], scale)


def test_bytes_on_disk_are_about_half_of_fp16(tmp_path):
    rows = rows_of(48, shape=(64, 128))
    build(tmp_path / "fp16", rows, store=None, shard_size=48)
    build(tmp_path / "int8", rows, shard_size=48)
    size = lambda root: (root / shard_name(0)).stat().st_size
    ratio = size(tmp_path / "int8") / size(tmp_path / "fp16")
    # 8,192 value bytes a row for 16,384 (8,283 B and 16,464 B a row on disk, measured), plus
    # HDF5's metadata, about 9 KB a shard (11 KB with the scales' dataset)
    assert 0.5 < ratio < 0.52, ratio
    fp16, int8 = cache_info(tmp_path / "fp16"), cache_info(tmp_path / "int8")
    assert (fp16["store"], int8["store"]) == ("float16", "int8")
    assert int8["raw_bytes"] == 48 * (64 * 128 + 4) and fp16["raw_bytes"] == 48 * 64 * 128 * 2
    assert 0.5 < int8["bytes_per_row"] / fp16["bytes_per_row"] < 0.52


def test_a_damaged_int8_row_is_refused_like_an_fp16_one(tmp_path):
    rows = rows_of(6, shape=(4, 6))
    build(tmp_path / "c", rows)
    shard = tmp_path / "c" / shard_name(1)
    flip_byte(shard, chunk_offsets(shard)[1] + 5)  # row 1 of shard 1 = img-4
    cache = FeatureCache(tmp_path / "c")
    assert np.abs(cache["img-3"] - rows["img-3"]).max() <= scale_of(rows["img-3"])
    with pytest.raises(BlitextError) as e:
        cache.get_batch(["img-3", "img-4"])
    text = str(e.value)
    assert str(shard) in text and "row 1" in text and "'img-4'" in text and "Fletcher-32" in text
    assert "blitext cache verify" in text and "\n" not in text
    report = verify_cache(tmp_path / "c", checksums=False)
    assert any(shard.name in p and "row 1" in p and "Fletcher-32" in p for p in report.problems)


def scale_chunk(shard: Path) -> int:
    with h5py.File(shard, "r") as f:
        return f["scale"].id.get_chunk_info(0).byte_offset


def test_damaged_row_scales_are_refused(tmp_path):
    build(tmp_path / "c", rows_of(6, shape=(4, 6)))
    shard = tmp_path / "c" / shard_name(0)
    flip_byte(shard, scale_chunk(shard) + 5)  # img-1's scale: every read of it would be silently wrong
    cache = FeatureCache(tmp_path / "c")
    assert cache["img-4"].shape == (4, 6)  # the other shard reads
    with pytest.raises(BlitextError) as e:
        cache["img-2"]
    text = str(e.value)
    assert str(shard) in text and "row scales" in text and "Fletcher-32" in text and "\n" not in text
    report = verify_cache(tmp_path / "c", checksums=False)
    assert any(shard.name in p and "row scales" in p for p in report.problems)


def test_int8_rows_without_their_scales_are_refused(tmp_path):
    build(tmp_path / "c", rows_of(3, shape=(4, 6)))
    with h5py.File(tmp_path / "c" / shard_name(0), "a") as f:
        del f["scale"]
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["shards"][0]["bytes"] = (tmp_path / "c" / shard_name(0)).stat().st_size
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BlitextError, match="lack their 'scale' dataset"):
        FeatureCache(tmp_path / "c")["img-1"]
    assert any("missing dataset(s) ['scale']" in p for p in verify_cache(tmp_path / "c", checksums=False).problems)


def test_mixing_stores_in_one_cache_is_refused(tmp_path):
    rows = rows_of(6, shape=(4, 6))
    keys = list(rows)
    fp16 = CachePlan(tmp_path / "c", "image-features", PRODUCER, keys, 3)
    start_or_resume(fp16)
    with ShardWriter(fp16, 0) as w:
        w.add(keys[:3], np.stack([rows[k] for k in keys[:3]]))
    int8 = CachePlan(tmp_path / "c", "image-features", PRODUCER, keys, 3, store="int8")
    with pytest.raises(BlitextError) as e:
        start_or_resume(int8)
    assert "--store fp16" in str(e.value) and "another --out" in str(e.value) and "\n" not in str(e.value)
    # a run.json from before stores were recorded holds fp16 rows: resumed by fp16, refused to int8
    run = json.loads((tmp_path / "c" / RUN).read_text())
    del run["store"]
    (tmp_path / "c" / RUN).write_text(json.dumps(run))
    start_or_resume(fp16)
    with pytest.raises(BlitextError, match="--store fp16"):
        start_or_resume(int8)


def test_a_cache_from_before_stores_opens_unchanged(tmp_path):
    rows = {k: v.astype(np.float16) for k, v in rows_of(4, shape=(4, 6)).items()}
    build(tmp_path / "c", rows, store=None)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    del manifest["store"]
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    cache = FeatureCache(tmp_path / "c")
    assert all(np.array_equal(cache[k], v) for k, v in rows.items())
    assert cache_info(tmp_path / "c")["store"] == "float16" and verify_cache(tmp_path / "c").ok


def test_an_fp16_cache_converts_to_int8_and_back(tmp_path):
    import test_cache

    rows = test_cache.random_rows(7)
    test_cache.build(tmp_path / "fp16", rows, failed=("bad-1",))  # shards of 3: the failure ends shard 2
    int8 = convert_store(tmp_path / "fp16", tmp_path / "int8", "int8")
    assert int8["store"] == "int8" and int8["count"] == 7 and int8["failed"][0]["key"] == "bad-1"
    assert int8["provenance"]["converted_from"] == str(tmp_path / "fp16") and len(int8["shards"]) == 3
    cache = FeatureCache(tmp_path / "int8")
    assert list(cache.keys) == list(rows)
    for key, row in rows.items():
        q, scale = quantise(row[None].astype(np.float32))
        assert np.array_equal(cache[key], (q[0] * scale[0]).astype(np.float16))  # quantised from the fp16 rows
    back = convert_store(tmp_path / "int8", tmp_path / "back", None)
    assert back["store"] == "float16"
    assert all(np.array_equal(FeatureCache(tmp_path / "back")[k], cache[k]) for k in rows)


def convert(*args):
    return CliRunner().invoke(app, ["cache", "convert", *map(str, args)])


def test_cache_convert_writes_an_int8_cache_that_opens(tmp_path):
    import test_cache

    rows = test_cache.random_rows(7, shape=(8, 16))
    test_cache.build(tmp_path / "fp16", rows, failed=("bad-1",))
    result = convert(tmp_path / "fp16", "--out", tmp_path / "int8")  # --store int8 is the default
    assert result.exit_code == 0, result.output
    assert "7 rows stored as int8" in " ".join(result.output.split())
    cache = FeatureCache(tmp_path / "int8")
    assert cache.manifest["store"] == "int8" and cache.manifest["failed"][0]["key"] == "bad-1"
    assert list(cache.keys) == list(rows) and verify_cache(tmp_path / "int8").ok
    for key, row in rows.items():
        want, got = row.astype(np.float32), cache[key].astype(np.float32)
        # half an int8 step of the row's scale, then fp16's rounding of the value read back
        assert np.abs(got - want).max() <= scale_of(want) / 2 + np.abs(want).max() * 2.0 ** -11, key
        assert not np.array_equal(got, want), key  # quantised, not copied


def test_cache_convert_mistakes_are_one_line(tmp_path, monkeypatch):
    import test_cache
    from test_faults import FullDisk

    test_cache.build(tmp_path / "fp16", test_cache.random_rows(4))
    assert f"{tmp_path / 'nowhere'} does not exist" in one_line_error(
        convert(tmp_path / "nowhere", "--out", tmp_path / "out"))
    (tmp_path / "a-file").write_text("x")
    assert f"{tmp_path / 'a-file'} exists and is not a blitext cache" in one_line_error(
        convert(tmp_path / "fp16", "--out", tmp_path / "a-file"))
    assert convert(tmp_path / "fp16", "--out", tmp_path / "int8").exit_code == 0
    text = one_line_error(convert(tmp_path / "int8", "--out", tmp_path / "again"))
    assert f"{tmp_path / 'int8'} is already stored as int8" in text and "--store fp16" in text
    assert "--store 'int4'" in one_line_error(convert(tmp_path / "fp16", "--out", tmp_path / "x", "--store", "int4"))
    monkeypatch.setattr(blitext.cache.writer, "open", FullDisk(0), raising=False)
    text = one_line_error(convert(tmp_path / "fp16", "--out", tmp_path / "full"))
    assert f"no space left on the device holding {tmp_path / 'full'}" in text


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return make_vision_folder("vit", tmp_path_factory.mktemp("vision") / "vit")


def extract(data: Path, vit: Path, out: Path, *more: str):
    return CliRunner().invoke(app, ["extract-features", "--data", str(data), "--vision-encoder", str(vit),
                                    "--batch-size", "2", "--shard-size", "4", "--num-workers", "0",
                                    "--device", "cpu", "--out", str(out), *more])


def test_extract_features_store_int8(tmp_path, vit):
    data = write_image_folder(tmp_path / "imgs", 6)
    fp16 = extract(data, vit, tmp_path / "fp16")
    assert fp16.exit_code == 0, fp16.output
    int8 = extract(data, vit, tmp_path / "int8", "--store", "int8")
    assert int8.exit_code == 0, int8.output
    assert "stored as int8" in " ".join(int8.output.split())  # the summary cache info prints
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    assert manifest["store"] == "int8" and manifest["provenance"]["config"]["store"] == "int8"
    assert manifest["producer"] == json.loads((tmp_path / "fp16" / "manifest.json").read_text())["producer"]
    a, b = FeatureCache(tmp_path / "fp16"), FeatureCache(tmp_path / "int8")
    x, y = a.get_batch(a.keys)[0].float(), b.get_batch(a.keys)[0].float()
    assert b.get_batch(a.keys)[0].dtype == torch.float16 and x.shape == y.shape
    step = x.abs().amax(dim=(1, 2), keepdim=True) / 127  # each row's scale (to fp16 rounding)
    assert ((x - y).abs() <= 0.6 * step).all() and (x - y).abs().max() > 0  # quantised, within half a step
    assert verify_cache(tmp_path / "int8").ok

    text = one_line_error(extract(data, vit, tmp_path / "int8"))  # resuming it as fp16 (the default)
    assert "--store int8" in text and "another --out" in text
    dry = {store: extract(data, vit, tmp_path / "dry", "--dry-run", "--store", store) for store in ("fp16", "int8")}
    per_row = {s: int(r.output.split("about ")[1].split(" B/row")[0].replace(",", "")) for s, r in dry.items()}
    assert "stored as int8" in " ".join(dry["int8"].output.split()) and not (tmp_path / "dry").exists()
    values = int(np.prod(manifest["row_shape"]))
    assert per_row["fp16"] - per_row["int8"] == values - 4  # a byte a value less, and 4 for the scale
    info = CliRunner().invoke(app, ["cache", "info", str(tmp_path / "int8")])
    assert info.exit_code == 0 and "stored as int8" in " ".join(info.output.split())
    video = CliRunner().invoke(app, ["extract-features", "--modality", "video", "--store", "int8"])
    assert "--store applies to images" in one_line_error(video)
