"""index/places.npy: rows' byte offsets in their shards, written once when a cache is finished
(or upgraded) and mapped by every reader, which then does not walk a shard's HDF5 chunk index."""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from blitext.cache import FeatureCache
from blitext.cache import chunks as chunks_module
from blitext.cache.keyindex import INDEX_DIR, PLACES
from blitext.cache.manifest import load_manifest, shard_name
from blitext.cache.chunks import RowPlaces
from blitext.cache.verify import verify_cache
from blitext.cli.main import app
from blitext.errors import BlitextError
from test_cache import build, random_rows, without_places
from test_cache_int8 import build as build_int8, rows_of
from test_damage import move_chunk
from test_faults import chunk_offsets, flip_byte, strip_row_checksums


def no_walks(monkeypatch) -> None:
    """Any walk of a shard's chunk index, in this process, fails the test."""
    def walked(*args, **kwargs):
        raise AssertionError("a shard's chunk index was walked")
    monkeypatch.setattr(chunks_module, "ChunkLayout", walked)


def every_row(cache: FeatureCache) -> list[np.ndarray]:
    return [cache[key] for key in cache.keys]


def built(root, store: str) -> dict[str, np.ndarray]:
    """7 rows in shards of 3 (the last holds one): fp16, or an int8 store."""
    if store == "int8":
        rows = rows_of(7, shape=(4, 6))
        build_int8(root, rows)
        return rows
    rows = random_rows(7)
    build(root, rows)
    return rows


@pytest.mark.parametrize("store", ["float16", "int8"])
def test_reads_through_places_equal_reads_through_the_chunk_index(tmp_path, store, monkeypatch):
    built(tmp_path / "c", store)
    shutil.copytree(tmp_path / "c", tmp_path / "old")
    without_places(tmp_path / "old")
    manifest = load_manifest(tmp_path / "c")
    offsets = np.concatenate([chunk_offsets(tmp_path / "c" / s["file"]) for s in manifest["shards"]])
    assert np.load(tmp_path / "c" / INDEX_DIR / PLACES).tolist() == offsets.tolist()
    assert manifest["index"]["bytes"][PLACES] == (tmp_path / "c" / INDEX_DIR / PLACES).stat().st_size
    walked = FeatureCache(tmp_path / "old")
    expected = every_row(walked)
    assert all(isinstance(s.places, RowPlaces) for s in walked._files)
    no_walks(monkeypatch)
    cache = FeatureCache(tmp_path / "c")
    for _ in range(2):  # first reads (checked), then from the memory map
        got = every_row(cache)
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(got, expected))
    assert all(s.file is None and isinstance(s.places, memoryview) for s in cache._files)
    batch, _ = cache.get_batch(["img-6", "img-2"])
    assert np.array_equal(batch.numpy(), np.stack([expected[6], expected[2]]))


def test_a_reader_holds_no_offsets_of_its_own(tmp_path, monkeypatch):
    """Per row, a process holds its checked bit: the offsets stay in the mapped places.npy."""
    import tracemalloc

    n = 10_000
    build(tmp_path / "c", {f"k{i}": np.full((2, 2), i, np.float16) for i in range(n)}, shard_size=n)
    no_walks(monkeypatch)
    cache = FeatureCache(tmp_path / "c")
    tracemalloc.start()
    try:
        assert all(cache[f"k{i}"][0, 0] == i for i in range(n))
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # 1,250 bytes of checked bits and the shard's few objects (~2.5 KB): RowPlaces held ~10 KB here
    assert held < n // 2, held


def test_a_flipped_byte_is_refused_in_one_line_naming_shard_and_row(tmp_path, monkeypatch):
    rows = built(tmp_path / "c", "float16")
    shard = tmp_path / "c" / shard_name(1)
    flip_byte(shard, chunk_offsets(shard)[2] + 3)  # img-5
    no_walks(monkeypatch)
    cache = FeatureCache(tmp_path / "c")
    assert np.array_equal(cache["img-4"], rows["img-4"])
    with pytest.raises(BlitextError) as e:
        cache["img-5"]
    text = str(e.value)
    assert str(shard) in text and "row 2 (key 'img-5')" in text and "Fletcher-32" in text and "\n" not in text


def test_a_chunk_lost_before_the_places_were_written_is_refused(tmp_path, monkeypatch):
    """Damage the index write finds (a chunk the chunk index moved) is -1 in places.npy: refused."""
    rows = built(tmp_path / "c", "float16")
    without_places(tmp_path / "c")
    shard = tmp_path / "c" / shard_name(0)
    move_chunk(shard, 1, 3)  # img-1's chunk now claims row 3, outside the shard's 3 rows
    result = CliRunner().invoke(app, ["cache", "upgrade", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "c" / INDEX_DIR / PLACES)[1] == -1
    no_walks(monkeypatch)
    cache = FeatureCache(tmp_path / "c")
    with pytest.raises(BlitextError) as e:
        cache["img-1"]
    text = str(e.value)
    assert str(shard) in text and "row 1 (key 'img-1')" in text and "when the cache was finished" in text
    assert "\n" not in text
    assert all(np.array_equal(cache[k], rows[k]) for k in ("img-0", "img-2", "img-5"))


def test_chunk_index_damage_after_the_places_were_written_does_not_change_a_read(tmp_path, monkeypatch):
    """A row's bytes stay where places.npy says, and are checked: the read is right, verify names the index."""
    rows = built(tmp_path / "c", "float16")
    shard = tmp_path / "c" / shard_name(0)
    move_chunk(shard, 1, 3)
    no_walks(monkeypatch)
    assert np.array_equal(FeatureCache(tmp_path / "c")["img-1"], rows["img-1"])
    monkeypatch.undo()
    assert any(shard.name in p and "row 1" in p for p in verify_cache(tmp_path / "c", checksums=False).problems)


def test_a_shard_replaced_after_the_places_were_written_walks_its_chunk_index(tmp_path):
    """Its first row's chunk is not where places.npy says: the shard reads as a cache without it."""
    rows = built(tmp_path / "c", "float16")
    strip_row_checksums(tmp_path / "c")  # every shard rewritten, its chunks moved
    cache = FeatureCache(tmp_path / "c")
    assert all(np.array_equal(cache[k], row) for k, row in rows.items())
    assert all(isinstance(s.places, RowPlaces) for s in cache._files)
    # batches gather places.npy's places (get_many): a walked shard's rows must not be read there
    assert all(np.array_equal(row, rows[k]) for k, row in zip(rows, cache.get_many(list(rows))))


def test_a_batch_reads_the_places_gathered_from_places_npy(tmp_path, monkeypatch):
    rows = built(tmp_path / "c", "float16")
    cache = FeatureCache(tmp_path / "c")
    keys = list(rows)[::-1]
    first = cache.get_many(keys)  # first reads: checked, through each shard's own places
    no_walks(monkeypatch)
    for shard in cache._files:
        shard.places = None  # the gathered places alone serve a checked row
    for got in (first, cache.get_many(keys)):
        assert all(np.array_equal(row, rows[k]) for k, row in zip(keys, got))


def test_a_cache_without_places_reads_as_before_and_upgrade_writes_them(tmp_path, monkeypatch):
    rows = built(tmp_path / "c", "float16")
    written = (tmp_path / "c" / INDEX_DIR / PLACES).read_bytes()
    without_places(tmp_path / "c")
    cache = FeatureCache(tmp_path / "c")  # no forced upgrade: the cache is left as it is
    assert all(np.array_equal(cache[k], row) for k, row in rows.items())
    assert all(isinstance(s.places, RowPlaces) for s in cache._files)
    assert not (tmp_path / "c" / INDEX_DIR / PLACES).exists()
    result = CliRunner().invoke(app, ["cache", "upgrade", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c" / INDEX_DIR / PLACES).read_bytes() == written
    assert PLACES in load_manifest(tmp_path / "c")["index"]["bytes"]
    no_walks(monkeypatch)
    assert all(np.array_equal(FeatureCache(tmp_path / "c")[k], row) for k, row in rows.items())


def test_places_of_the_wrong_size_are_rebuilt_on_open(tmp_path, monkeypatch):
    rows = built(tmp_path / "c", "float16")
    path = tmp_path / "c" / INDEX_DIR / PLACES
    written = path.read_bytes()
    path.write_bytes(written[:-8])
    cache = FeatureCache(tmp_path / "c")
    assert path.read_bytes() == written
    assert all(np.array_equal(cache[k], row) for k, row in rows.items())


def test_an_empty_cache_has_empty_places(tmp_path):
    manifest = build(tmp_path / "e", {}, failed=("bad-0",))
    assert manifest["index"]["bytes"][PLACES] and len(np.load(tmp_path / "e" / INDEX_DIR / PLACES)) == 0
    cache = FeatureCache(tmp_path / "e")
    assert len(cache) == 0 and cache._places is not None and "bad-0" not in cache


def test_variable_length_rows_have_no_places(tmp_path):
    rows = {f"v{i}": np.full((1 + i, 2), i, np.float16) for i in range(5)}
    manifest = build(tmp_path / "v", rows, variable=True)
    assert PLACES not in manifest["index"]["bytes"] and not (tmp_path / "v" / INDEX_DIR / PLACES).exists()
    cache = FeatureCache(tmp_path / "v")
    assert all(np.array_equal(cache[k], row) for k, row in rows.items())


def test_compressed_rows_have_no_places(tmp_path):
    """Rows HDF5 must decode are read through it: the index write leaves places.npy out."""
    from blitext.cache.keyindex import upgrade

    rows = built(tmp_path / "c", "float16")
    manifest = load_manifest(tmp_path / "c")
    path = tmp_path / "c" / manifest["shards"][1]["file"]
    with h5py.File(path, "a") as f:
        data = f["data"][:]
        del f["data"]
        f.create_dataset("data", data=data, chunks=(1, *data.shape[1:]), compression="gzip", fletcher32=True)
    manifest["shards"][1]["bytes"] = path.stat().st_size
    assert PLACES not in upgrade(tmp_path / "c", manifest)["index"]["bytes"]
    assert not (tmp_path / "c" / INDEX_DIR / PLACES).exists()
    cache = FeatureCache(tmp_path / "c")
    assert all(np.array_equal(cache[k], row) for k, row in rows.items())
