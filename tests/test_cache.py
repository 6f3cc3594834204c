"""The sharded HDF5 cache: round trips, lazy per-worker files, verification, refusal of mismatches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from blitext.cache import CachePlan, FeatureCache, ShardWriter, finalize, pending_shards, start_or_resume
from blitext.cache.keyindex import INDEX_DIR, PLACES
from blitext.cache.manifest import MANIFEST, shard_name
from blitext.cache.verify import cache_info, verify_cache
from blitext.errors import BlitextError

ROOT = Path(__file__).resolve().parents[1]
PRODUCER = {"encoder": "enc", "fingerprint": "enc@0123", "preprocessing": {"resize": 224}}


def build(root, rows: dict[str, np.ndarray], shard_size=3, variable=False, failed=(), producer=PRODUCER):
    keys = list(rows) + list(failed)
    plan = CachePlan(root, "image-features", producer, keys, shard_size, variable_length=variable)
    start_or_resume(plan)
    for s in pending_shards(plan):
        with ShardWriter(plan, s) as w:
            for i in plan.shard_range(s):
                key = keys[i]
                if key in failed:
                    w.fail(key, f"{key}.png", "not an image")
                else:
                    w.add([key], [rows[key]])
    return finalize(plan)


def without_places(root) -> None:
    """The cache as blitext finished it before index/places.npy: each shard walks its chunk index."""
    manifest = json.loads((root / MANIFEST).read_text())
    del manifest["index"]["bytes"][PLACES]
    (root / MANIFEST).write_text(json.dumps(manifest))
    (root / INDEX_DIR / PLACES).unlink()


def random_rows(n, shape=(4, 6), seed=0):
    rng = np.random.default_rng(seed)
    return {f"img-{i}": rng.standard_normal(shape).astype(np.float16) for i in range(n)}


def test_fixed_rows_round_trip_by_key_and_batch(tmp_path):
    rows = random_rows(7)
    manifest = build(tmp_path / "c", rows, failed=("bad-1",))
    cache = FeatureCache(tmp_path / "c")
    assert len(cache) == 7 and manifest["count"] == 7 and manifest["num_failed"] == 1
    assert manifest["failed"] == [{"key": "bad-1", "input": "bad-1.png", "reason": "not an image"}]
    for key, row in rows.items():
        assert np.array_equal(cache[key], row)
    batch, mask = cache.get_batch(["img-5", "img-0"])
    assert mask is None and torch.equal(batch, torch.from_numpy(np.stack([rows["img-5"], rows["img-0"]])))
    assert manifest["row_shape"] == [4, 6] and len(manifest["shards"]) == 3
    with h5py.File(tmp_path / "c" / shard_name(0)) as f:
        assert f["data"].chunks == (1, 4, 6) and f["data"].compression is None and f["data"].dtype == np.float16
    with pytest.raises(BlitextError, match="'nope' is not in the cache"):
        cache["nope"]


def test_variable_length_rows_with_mask(tmp_path):
    rng = np.random.default_rng(1)
    rows = {f"vid-{i}": rng.standard_normal((t, 5)).astype(np.float16) for i, t in enumerate([3, 1, 7, 2])}
    manifest = build(tmp_path / "v", rows, variable=True)
    cache = FeatureCache(tmp_path / "v")
    assert manifest["row_shape"] == [None, 5]
    for key, row in rows.items():
        assert np.array_equal(cache[key], row)
    batch, mask = cache.get_batch(["vid-0", "vid-2"])
    assert batch.shape == (2, 7, 5) and mask.sum(1).tolist() == [3, 7]
    assert torch.all(batch[0, 3:] == 0)


def test_dataset_in_dataloader_workers_opens_files_lazily(tmp_path):
    rows = random_rows(10)
    build(tmp_path / "c", rows)
    cache = FeatureCache(tmp_path / "c")
    cache["img-0"]  # the parent has an open handle; workers must not reuse it
    loader = torch.utils.data.DataLoader(cache.dataset(), batch_size=4, num_workers=2)
    got = {k: x for keys, xs in loader for k, x in zip(keys, xs)}
    assert set(got) == set(rows)
    assert all(np.array_equal(got[k].numpy(), rows[k]) for k in rows)


READ_WITHOUT_TORCH = """
import sys
import blitext.cache
cache = blitext.cache.FeatureCache(sys.argv[1])
row = cache["img-3"]
print("torch" in sys.modules, row.dtype, row.shape)
batch, _ = cache.get_batch(["img-3"])  # what returns tensors imports torch itself
print("torch" in sys.modules, type(batch).__name__, tuple(batch.shape))
"""


def test_a_process_that_reads_a_cache_does_not_import_torch(tmp_path):
    """torch is about 200 MB of a process's memory: a reader of rows as numpy goes without it."""
    build(tmp_path / "c", random_rows(5))
    proc = subprocess.run([sys.executable, "-c", READ_WITHOUT_TORCH, str(tmp_path / "c")], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (
                              str(ROOT), os.environ.get("PYTHONPATH"))))}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == ["False float16 (4, 6)", "True Tensor (1, 4, 6)"]


def test_mismatched_producer_is_refused_with_both_named(tmp_path):
    build(tmp_path / "c", random_rows(2))
    other = {**PRODUCER, "fingerprint": "clip@9999", "preprocessing": {"resize": 336}}
    with pytest.raises(BlitextError) as e:
        FeatureCache(tmp_path / "c", expect=other, fix="re-run extract-features")
    text = str(e.value)
    assert "enc@0123" in text and "clip@9999" in text and "336" in text and "re-run extract-features" in text


def test_encoder_named_by_another_path_is_the_same_producer(tmp_path):
    # Caches made before the encoder's resolved path was recorded hold the string the user typed.
    build(tmp_path / "c", random_rows(2), producer={**PRODUCER, "encoder": "./models/enc"})
    FeatureCache(tmp_path / "c", expect={**PRODUCER, "encoder": "/home/u/models/enc"})  # same fingerprint
    with pytest.raises(BlitextError, match="fingerprint=enc@0123.*fingerprint=enc@4567"):
        FeatureCache(tmp_path / "c", expect={**PRODUCER, "encoder": "/home/u/models/enc", "fingerprint": "enc@4567"})


def test_unfinished_cache_is_not_readable(tmp_path):
    plan = CachePlan(tmp_path / "c", "image-features", PRODUCER, ["a", "b"], 1)
    start_or_resume(plan)
    with pytest.raises(BlitextError, match="unfinished"):
        FeatureCache(tmp_path / "c")


def test_resume_keeps_done_shards_and_drops_partial_ones(tmp_path):
    plan = CachePlan(tmp_path / "c", "image-features", PRODUCER, [f"k{i}" for i in range(6)], 2)
    start_or_resume(plan)
    with ShardWriter(plan, 0) as w:
        w.add(["k0", "k1"], np.ones((2, 3)))
    partial = tmp_path / "c" / f".{shard_name(1)}.tmp999"
    partial.write_bytes(b"half a shard")
    (tmp_path / "c" / shard_name(2)).write_bytes(b"renamed but no sidecar yet")
    assert pending_shards(plan) == [1, 2]
    assert not partial.exists()
    start_or_resume(plan)  # same job: accepted
    changed = CachePlan(tmp_path / "c", "image-features", PRODUCER, [f"k{i}" for i in range(7)], 2)
    with pytest.raises(BlitextError, match="different plan sha256"):
        start_or_resume(changed)
    other = CachePlan(tmp_path / "c", "image-features", {**PRODUCER, "fingerprint": "x@1"}, plan.keys, 2)
    with pytest.raises(BlitextError, match="x@1"):
        start_or_resume(other)


def test_refuses_to_write_into_a_folder_that_is_not_a_cache(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(BlitextError, match="not a blitext cache"):
        start_or_resume(CachePlan(tmp_path / "c", "image-features", PRODUCER, ["a"], 1))


def test_verify_finds_corruption_and_nan(tmp_path):
    rows = random_rows(6)
    rows["img-4"][0, 0] = np.nan
    build(tmp_path / "c", rows)
    report = verify_cache(tmp_path / "c")
    assert not report.ok and any("NaN" in p for p in report.problems)

    build(tmp_path / "d", random_rows(6))
    assert verify_cache(tmp_path / "d").ok
    shard = tmp_path / "d" / shard_name(1)
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = verify_cache(tmp_path / "d")
    assert [p for p in report.problems if "checksum" in p and shard.name in p]
    shard.unlink()
    assert any("missing" in p for p in verify_cache(tmp_path / "d").problems)


def test_info_reports_bytes_against_raw_fp16(tmp_path):
    build(tmp_path / "c", random_rows(9, shape=(49, 64)))
    info = cache_info(tmp_path / "c")
    assert info["rows"] == 9 and info["raw_bytes"] == 9 * 49 * 64 * 2
    assert 0 <= info["overhead"] < 0.5  # HDF5 metadata and keys on a tiny cache
