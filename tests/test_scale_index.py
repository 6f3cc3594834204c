"""The key index: lookups through memory-mapped files, hash collisions, old caches upgraded or refused."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from blitext.cache import FeatureCache
from blitext.cache import keyindex
from blitext.cache.keyindex import INDEX_DIR, KeyIndex
from blitext.cache.manifest import FORMAT, KEY_SPANS, KEYS_IN_MANIFEST, MANIFEST, load_manifest, sidecar_name
from blitext.errors import BlitextError
from tests.test_cache import build, random_rows, without_places


def test_manifest_keeps_shard_summaries_and_keys_are_found_through_the_index(tmp_path):
    rows = random_rows(11)
    manifest = build(tmp_path / "c", rows, shard_size=4)
    assert all("keys" not in shard for shard in manifest["shards"])
    assert manifest["index"]["rows"] == 11
    cache = FeatureCache(tmp_path / "c")
    assert isinstance(cache.index, KeyIndex) and not isinstance(cache.keys, (list, dict))
    assert cache.keys == list(rows) and cache.keys[2:4] == ["img-2", "img-3"] and cache.keys[-1] == "img-10"
    for key, row in rows.items():
        assert np.array_equal(cache[key], row)
    assert "img-7" in cache and "img-77" not in cache and 7 not in cache.keys
    assert cache.keys.index("img-9") == 9 and cache.locate("img-9") == (2, 1)


def test_keys_whose_hashes_share_the_high_half_are_told_apart_by_the_low_half(tmp_path, monkeypatch):
    _hash_all_keys_as(monkeypatch, _high_half(lambda key: 7))  # every key's home and high half collide
    rows = random_rows(6)
    build(tmp_path / "c", rows, shard_size=4)
    cache = FeatureCache(tmp_path / "c")
    assert set(np.asarray(cache.index.slots)[:, 0].tolist()) == {7}
    for key, row in rows.items():
        assert np.array_equal(cache[key], row)
    assert "img-9" not in cache


def test_two_keys_of_one_whole_hash_are_refused_when_the_index_is_written(tmp_path, monkeypatch):
    """Lookups trust the 128-bit hash, so the writer refuses keys it cannot tell apart, naming them."""
    real = keyindex.hash_bytes
    _hash_all_keys_as(monkeypatch, lambda key: (7, 7) if key in (b"img-1", b"img-3") else real(key))
    with pytest.raises(BlitextError, match=r"keys 'img-1' and 'img-3' share one 128-bit BLAKE2b hash"):
        build(tmp_path / "c", random_rows(5))


def test_index_pickles_as_its_folder_and_reads_the_same_keys(tmp_path):
    build(tmp_path / "c", random_rows(5))
    cache = FeatureCache(tmp_path / "c")
    again = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache.index)) < 1000  # the files are not copied into the pickle
    assert again.keys == cache.keys and np.array_equal(again["img-3"], cache["img-3"])


def test_empty_cache_opens(tmp_path):
    build(tmp_path / "e", {}, failed=("bad-0",))
    cache = FeatureCache(tmp_path / "e")
    assert len(cache) == 0 and list(cache.keys) == [] and "bad-0" not in cache


def _as_format_1(root):
    """The cache as blitext wrote it before the key index: keys in the manifest, no index/."""
    manifest = load_manifest(root)
    for i, shard in enumerate(manifest["shards"]):
        shard["keys"] = json.loads((root / sidecar_name(i)).read_text())["keys"]
    manifest["format"] = KEYS_IN_MANIFEST
    del manifest["index"]
    (root / MANIFEST).write_text(json.dumps(manifest))
    for f in (root / INDEX_DIR).iterdir():
        f.unlink()
    (root / INDEX_DIR).rmdir()


def test_old_cache_gets_its_index_on_first_open(tmp_path):
    rows = random_rows(7)
    build(tmp_path / "c", rows)
    _as_format_1(tmp_path / "c")
    cache = FeatureCache(tmp_path / "c")
    assert cache.keys == list(rows) and np.array_equal(cache["img-6"], rows["img-6"])
    upgraded = load_manifest(tmp_path / "c")
    assert upgraded["format"] == FORMAT and all("keys" not in s for s in upgraded["shards"])


def test_old_read_only_cache_is_refused_naming_the_upgrade(tmp_path, monkeypatch):
    build(tmp_path / "c", random_rows(4))
    _as_format_1(tmp_path / "c")
    monkeypatch.setattr(keyindex.os, "access", lambda path, mode: False)  # read-only, even for root
    with pytest.raises(BlitextError, match=r"read-only; run `blitext cache upgrade .*c` once"):
        FeatureCache(tmp_path / "c")


def _with_the_sorted_hash_index(root):
    """The cache as blitext wrote it before slots.npy: sorted hashes (hashes.npy) and their rows (rows.npy)."""
    folder = root / INDEX_DIR
    keys = list(FeatureCache(root).keys)
    hashes = keyindex.hash_many([k.encode() for k in keys])[:, 0]
    rows = np.argsort(hashes, kind="stable")
    np.save(folder / "hashes.npy", hashes[rows])
    np.save(folder / "rows.npy", rows.astype(np.int64))
    (folder / "slots.npy").unlink()
    manifest = load_manifest(root)
    old = ("keys.bin", "offsets.npy", "hashes.npy", "rows.npy")
    manifest["index"]["bytes"] = {name: (folder / name).stat().st_size for name in old}
    manifest["format"] = "blitext-cache/2"
    (root / MANIFEST).write_text(json.dumps(manifest))


def _with_key_spans(root):
    """The cache as format 3 wrote it: slots of (64-bit hash, row, start << 24 | length of the key in
    keys.bin), the key's bytes compared on each lookup."""
    import hashlib

    folder = root / INDEX_DIR
    keys = [k.encode() for k in FeatureCache(root).keys]
    offsets = np.load(folder / "offsets.npy")
    hashes = np.array([int.from_bytes(hashlib.blake2b(k, digest_size=8).digest(), "little") for k in keys], np.uint64)
    order = np.argsort(hashes, kind="stable")
    records = np.stack([hashes[order], order.astype(np.uint64),
                        (offsets[:-1][order].astype(np.uint64) << np.uint64(24)) | np.diff(offsets)[order].astype(np.uint64)], 1)
    places = keyindex._places(records[:, 0], keyindex.slot_bits(len(order)))
    np.save(folder / "slots.npy", records[np.searchsorted(places, np.arange(places[-1] + 1))])
    manifest = load_manifest(root)
    manifest["index"]["bytes"]["slots.npy"] = (folder / "slots.npy").stat().st_size
    manifest["format"] = KEY_SPANS
    (root / MANIFEST).write_text(json.dumps(manifest))


OLD_INDEXES = {  # each older index layout, and what its read-only refusal says it lacks
    "sorted-hashes": (_with_the_sorted_hash_index, r"older layout \(without index/slots.npy\)"),
    "key-spans": (_with_key_spans, r"format is 'blitext-cache/3', before 'blitext-cache/4'"),
}


@pytest.mark.parametrize("layout", OLD_INDEXES)
def test_an_older_index_is_upgraded_on_first_open(tmp_path, layout):
    """Format 3's slots hold 64-bit hashes and key spans: read as 128-bit halves they would find nothing."""
    rows = random_rows(9)
    build(tmp_path / "c", rows)
    OLD_INDEXES[layout][0](tmp_path / "c")
    cache = FeatureCache(tmp_path / "c")
    assert cache.keys == list(rows) and all(np.array_equal(cache[k], row) for k, row in rows.items())
    assert "img-9" not in cache and cache.index.locate_many(list(rows)).tolist() == list(range(9))
    files = sorted((*keyindex.FILES, keyindex.PLACES))  # fixed rows: their places too
    assert sorted(p.name for p in (tmp_path / "c" / INDEX_DIR).iterdir()) == files
    upgraded = load_manifest(tmp_path / "c")
    assert sorted(upgraded["index"]["bytes"]) == files and upgraded["format"] == FORMAT


@pytest.mark.parametrize("layout", OLD_INDEXES)
def test_an_older_index_read_only_is_refused_naming_the_upgrade(tmp_path, monkeypatch, layout):
    build(tmp_path / "c", random_rows(4))
    make_old, lacks = OLD_INDEXES[layout]
    make_old(tmp_path / "c")
    monkeypatch.setattr(keyindex.os, "access", lambda path, mode: False)  # read-only, even for root
    with pytest.raises(BlitextError, match=lacks + r" and the folder is read-only; run `blitext cache upgrade .*c` once"):
        FeatureCache(tmp_path / "c")


def test_a_newer_format_is_refused_in_one_line(tmp_path):
    build(tmp_path / "c", random_rows(3))
    manifest = load_manifest(tmp_path / "c")
    (tmp_path / "c" / MANIFEST).write_text(json.dumps({**manifest, "format": "blitext-cache/9"}))
    with pytest.raises(BlitextError, match=r"has format 'blitext-cache/9'; this blitext reads 'blitext-cache/4'"):
        FeatureCache(tmp_path / "c")


def test_damaged_index_is_rebuilt_from_the_sidecars(tmp_path):
    rows = random_rows(5)
    build(tmp_path / "c", rows)
    (tmp_path / "c" / INDEX_DIR / "keys.bin").write_bytes(b"x")
    cache = FeatureCache(tmp_path / "c")
    assert cache.keys == list(rows) and np.array_equal(cache["img-1"], rows["img-1"])


def test_cache_upgrade_command_slims_an_old_manifest(tmp_path):
    from typer.testing import CliRunner

    from blitext.cli.main import app

    rows = random_rows(5)
    build(tmp_path / "c", rows)
    _as_format_1(tmp_path / "c")
    result = CliRunner().invoke(app, ["cache", "upgrade", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "5 keys indexed" in " ".join(result.output.split())  # rich wraps long lines anywhere
    manifest = load_manifest(tmp_path / "c")
    assert manifest["index"]["rows"] == 5 and all("keys" not in s for s in manifest["shards"])
    assert FeatureCache(tmp_path / "c").keys == list(rows)


def _many(root, n=3000):
    keys = [f"COCO_train2014_{i:012d}" for i in range(n)]
    build(root, dict(zip(keys, np.arange(n, dtype=np.float16).reshape(n, 1, 1) * np.ones((1, 2, 2), np.float16))),
          shard_size=1000)
    return keys


def test_every_key_of_a_larger_cache_is_found_and_others_are_not(tmp_path):
    keys = _many(tmp_path / "c")
    index = FeatureCache(tmp_path / "c").index
    assert [index.locate(k) for k in keys] == list(range(len(keys)))
    assert all(index.locate(k + "x") == -1 for k in keys[::7])
    assert index.shard_row(2999) == (2, 999) and index.shard_row(1000) == (1, 0)


def test_lookups_hold_when_hashes_are_not_uniform(tmp_path, monkeypatch):
    """Skewed hashes pile up in long runs of slots past their home: slower to find, still found."""
    _hash_all_keys_as(monkeypatch, _high_half(lambda key: int(key[-4:]) % 1500))  # small, repeated
    keys = _many(tmp_path / "c")
    index = FeatureCache(tmp_path / "c").index
    assert [index.locate(k) for k in keys] == list(range(len(keys)))
    assert index.locate("COCO_train2014_000000009999") == -1


def test_opening_a_cache_allocates_nothing_per_row(tmp_path):
    """Opening maps the index: no dict or list of keys, no per-row list, in any process."""
    import tracemalloc

    _many(tmp_path / "c", n=5_000)
    tracemalloc.start()
    try:
        cache = FeatureCache(tmp_path / "c")
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 60_000, peak  # a dict of 5,000 keys with their (shard, row) tuples is ~0.5 MB
    assert held < 30_000, held  # ~13 KB (the manifest); a list of 5,000 row offsets alone is 40 KB
    assert len(cache) == 5_000 and cache.keys[4_999] == "COCO_train2014_000000004999"


def test_reading_every_row_keeps_about_a_byte_per_row(tmp_path):
    """A process that read every row (a DataLoader worker after one pass) holds a bit and a share
    of a run per row, not a Python int per row (36 bytes each, in every worker)."""
    import tracemalloc

    keys = _many(tmp_path / "c", n=5_000)
    cache = FeatureCache(tmp_path / "c")
    tracemalloc.start()
    try:
        for _ in range(2):  # first reads (checked through HDF5), then from the memory map
            assert all(cache[k][0, 0] == i for i, k in enumerate(keys))
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert all(cache._files[s].start(999) >= 0 for s in range(5))  # every row now comes from the map
    assert held < 5_000 * 8, held


def test_row_places_hold_every_chunk_offset(tmp_path):
    """The runs give back each row's chunk address exactly: where the chunk index's nodes break
    the spacing, at damaged rows (-1) and at steps other than the commonest."""
    import h5py

    from blitext.cache.chunks import RowPlaces

    keys = _many(tmp_path / "c")
    without_places(tmp_path / "c")  # the shard walks its chunk index, and keeps RowPlaces
    cache = FeatureCache(tmp_path / "c")
    cache[keys[0]]
    written = [-1] * 1_000
    with h5py.File(tmp_path / "c" / cache.manifest["shards"][0]["file"], "r") as f:
        f["data"].id.chunk_iter(lambda info: written.__setitem__(info.chunk_offset[0], info.byte_offset))
    places = cache._files[0].places
    assert [places[r] for r in range(1_000)] == written
    assert len(places.first) < 100  # runs, not rows
    odd = np.array([-1, -1, 100, 112, 124, -1, 200, 212, 5_000, 5_006, 5_012, 5_018, -1], np.int64)
    places = RowPlaces(odd)
    assert [places[r] for r in range(len(odd))] == odd.tolist()
    mixed = np.cumsum(np.random.default_rng(0).choice([12, 12, 12, 40], 500))  # runs of any length, over blocks
    places = RowPlaces(mixed)
    assert [places[r] for r in range(len(mixed))] == mixed.tolist()


def test_a_shard_read_through_hdf5_bounds_its_metadata_cache(tmp_path):
    """HDF5's metadata cache grows to 32 MB per open file by default (about 8x that in memory),
    in every process: a shard that stays open (variable-length rows are read through HDF5) caps it."""
    from blitext.cache.chunks import METADATA_CACHE_BYTES

    rows = {f"v{i}": np.full((1 + i % 40, 2), i, np.float16) for i in range(3_000)}
    build(tmp_path / "c", rows, shard_size=3_000, variable=True)
    cache = FeatureCache(tmp_path / "c")
    assert all(np.array_equal(cache[k], row) for k, row in rows.items())
    file = cache._files[0].file.id
    assert file.get_mdc_config().max_size == METADATA_CACHE_BYTES <= 256 * 1024
    assert file.get_mdc_size()[2] <= METADATA_CACHE_BYTES


def _hash_all_keys_as(monkeypatch, fn):
    """Every key hashed by fn (bytes -> (high, low)), one at a time (locate) and in batches
    (locate_many, the writer)."""
    monkeypatch.setattr(keyindex, "hash_bytes", fn)
    monkeypatch.setattr(keyindex, "hash_many", lambda keys: np.array([fn(k) for k in keys], np.uint64).reshape(-1, 2))


def _high_half(high):
    """A hash whose high half is high(key) and low half the real one's: homes collide, keys do not."""
    real = keyindex.hash_bytes
    return lambda key: (high(key), real(key)[1])


def _asked(keys):
    """The cache's keys with some it lacks: longer, shorter, empty, non-ASCII, one of another's length."""
    return keys + [k + "x" for k in keys[::97]] + [keys[5][:-1], "", "bïld-ünicode", "COCO_train2014_99999999999x"]


def test_hashes_in_batches_are_the_single_hashes():
    keys = [k.encode() for k in ["", "a", "COCO_train2014_000000123456", "bïld", "x" * 300]]
    assert [tuple(h) for h in keyindex.hash_many(keys).tolist()] == [keyindex.hash_bytes(k) for k in keys]
    assert len(set(keyindex.hash_many(keys)[:, 1].tolist())) == len(keys)  # both halves are the digest's
    assert keyindex.hash_many([]).dtype == np.uint64 and keyindex.hash_many([]).shape == (0, 2)


@pytest.mark.parametrize("batch", [1, 7, 512])
def test_batches_of_lookups_find_what_single_lookups_find(tmp_path, batch):
    index = FeatureCache(_many_at(tmp_path)).index
    asked = _asked(list(index))
    rng = np.random.default_rng(0)
    asked = [asked[i] for i in rng.permutation(len(asked))]
    found = np.concatenate([index.locate_many(asked[i:i + batch]) for i in range(0, len(asked), batch)])
    assert found.dtype == np.int64 and found.tolist() == [index.locate(k) for k in asked]
    assert (found >= 0).sum() == 3000 and len(index.locate_many([])) == 0


def test_batches_tell_apart_keys_of_one_high_half(tmp_path, monkeypatch):
    _hash_all_keys_as(monkeypatch, _high_half(lambda key: 7))  # every home collides: all but the first go to locate()
    rows = random_rows(6)
    build(tmp_path / "c", rows, shard_size=4)
    index = FeatureCache(tmp_path / "c").index
    asked = [*rows, "img-9", "img-0", ""]
    assert index.locate_many(asked).tolist() == [0, 1, 2, 3, 4, 5, -1, 0, -1]


def test_batches_walk_long_runs_of_slots_and_past_the_last(tmp_path, monkeypatch):
    """Skewed hashes: every key's home is slot 0, so a walk crosses hundreds of WINDOWs; a key
    of the largest hash, missing, walks past the last record."""
    _hash_all_keys_as(monkeypatch, _high_half(lambda key: int(key[-4:]) % 1500))
    keys = _many(tmp_path / "c")
    index = FeatureCache(tmp_path / "c").index
    asked = keys + ["COCO_train2014_000000x01499", "missing-1499", "missing-0000"]
    assert index.locate_many(asked).tolist() == list(range(len(keys))) + [-1, -1, -1]


def test_an_empty_index_finds_nothing_in_batches(tmp_path):
    build(tmp_path / "e", {}, failed=("bad-0",))
    assert FeatureCache(tmp_path / "e").index.locate_many(["bad-0", ""]).tolist() == [-1, -1]


def test_reading_in_batches_gives_what_single_reads_give(tmp_path):
    """get_many: first reads (checked) and later ones, a key twice, rows of several shards."""
    rows = random_rows(20)
    build(tmp_path / "c", rows, shard_size=6)
    cache = FeatureCache(tmp_path / "c")
    asked = ["img-3", "img-17", "img-3", "img-8", "img-0"]
    first = cache.get_many(asked)  # none read yet: through each shard's first-read check
    again = cache.get_many(asked + list(rows))  # now from the memory maps
    for key, row in zip(asked + asked + list(rows), first + again):
        assert np.array_equal(row, rows[key])
    again[0][...] = 0  # a copy, not the map
    assert np.array_equal(cache["img-3"], rows["img-3"])


def test_reading_a_missing_key_in_a_batch_names_it(tmp_path):
    build(tmp_path / "c", random_rows(4))
    with pytest.raises(BlitextError, match="key 'img-77' is not in the cache"):
        FeatureCache(tmp_path / "c").get_many(["img-1", "img-77", "img-88"])


def test_a_dataloader_reads_a_batch_through_get_many(tmp_path, monkeypatch):
    import torch

    rows = random_rows(9)
    build(tmp_path / "c", rows, shard_size=4)
    cache = FeatureCache(tmp_path / "c")
    batches = []
    monkeypatch.setattr(cache, "get_many", lambda keys: batches.append(list(keys)) or FeatureCache.get_many(cache, keys))
    loader = torch.utils.data.DataLoader(cache.dataset(), batch_size=4, collate_fn=list)
    items = [item for batch in loader for item in batch]
    assert [key for key, _ in items] == list(rows) and batches == [list(rows)[:4], list(rows)[4:8], list(rows)[8:]]
    assert all(np.array_equal(tensor.numpy(), rows[key]) for key, tensor in items)


def _many_at(tmp_path):
    _many(tmp_path / "c")
    return tmp_path / "c"
