"""Issue 22: nothing damaged is ever used. A row whose chunk the shard's chunk index lost or moved
is refused on read (HDF5 would read it as zeros), and so is a chunk address outside the file.

Readers of a cache with index/places.npy take rows' places from it, not from the chunk index
(tests/test_cache_places.py): the reads here are those of a cache without it (without_places),
whose shards walk their chunk index when they open."""
from __future__ import annotations

import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from blitext.cache import FeatureCache
from blitext.cache.manifest import shard_name
from blitext.cache.verify import verify_cache
from blitext.cli.main import app
from blitext.errors import BlitextError
from test_cache import without_places
from test_faults import build, strip_row_checksums


def chunk_key(shard: Path, row: int) -> int:
    """Where row `row`'s key sits in the shard's chunk index (a v1 B-tree: chunk size, filter mask,
    then the chunk's coordinates, 8 bytes each; the chunk's address follows the key)."""
    with h5py.File(shard, "r") as f:
        size, ndim = f["data"].id.get_chunk_info(0).size, f["data"].ndim
    key = struct.pack("<II", size, 0) + struct.pack(f"<{ndim + 1}Q", row, *[0] * ndim)
    raw = shard.read_bytes()
    assert raw.count(key) == 1
    return raw.index(key)


def patch(path: Path, offset: int, value: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(value)] = value
    path.write_bytes(bytes(raw))


def move_chunk(shard: Path, row: int, to: int) -> None:
    """One flipped bit in the chunk index: row `row`'s chunk now claims coordinate `to`."""
    patch(shard, chunk_key(shard, row) + 8, struct.pack("<Q", to))


def refused_row(root: Path, key: str) -> str:
    with pytest.raises(BlitextError) as e:
        FeatureCache(root)[key]
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("checksums", [True, False], ids=["fletcher32", "unchecked"])
def test_a_row_whose_chunk_moved_in_the_index_is_refused_not_read_as_zeros(tmp_path, checksums):
    rows = build(tmp_path / "c")
    without_places(tmp_path / "c")
    if not checksums:
        strip_row_checksums(tmp_path / "c")
    shard = tmp_path / "c" / shard_name(0)
    move_chunk(shard, 1, 3)  # img-1's chunk now claims row 3, outside the shard's 3 rows
    with h5py.File(shard, "r") as f:
        assert not f["data"][1].any()  # what HDF5 itself reads: the fill value
    text = refused_row(tmp_path / "c", "img-1")
    assert str(shard) in text and "row 1" in text and "'img-1'" in text and "chunk" in text
    cache = FeatureCache(tmp_path / "c")
    for key in ("img-0", "img-2", "img-4"):  # the rest of the shard, and other shards, still read
        assert np.array_equal(cache[key], rows[key])
    report = verify_cache(tmp_path / "c", checksums=False)
    assert any(shard.name in p and "row 1" in p for p in report.problems), report.problems


def test_a_fill_value_read_of_a_written_row_is_damage(tmp_path):
    build(tmp_path / "c", n=3)
    without_places(tmp_path / "c")
    move_chunk(tmp_path / "c" / shard_name(0), 2, 7)
    cache = FeatureCache(tmp_path / "c")
    cache._shard(0).damaged.clear()  # as if the layout check when the shard opened had missed it
    with pytest.raises(BlitextError, match="row 2 .*reads as the fill value"):
        cache["img-2"]


def test_a_zero_row_that_was_written_reads_as_zeros(tmp_path):
    from blitext.cache import CachePlan, ShardWriter, finalize, pending_shards, start_or_resume

    plan = CachePlan(tmp_path / "z", "image-features", {"encoder": "e"}, ["a", "b"], 2)
    start_or_resume(plan)
    for s in pending_shards(plan):
        with ShardWriter(plan, s) as w:
            w.add(["a", "b"], np.zeros((2, 4, 6), np.float16))
    finalize(plan)
    assert not FeatureCache(tmp_path / "z")["b"].any()


def test_a_chunk_address_outside_the_file_is_one_line(tmp_path):
    build(tmp_path / "c")
    without_places(tmp_path / "c")
    shard = tmp_path / "c" / shard_name(1)
    with h5py.File(shard, "r") as f:
        ndim = f["data"].ndim
    address = chunk_key(shard, 1) + 8 + 8 * (ndim + 1)
    raw = shard.read_bytes()
    patch(shard, address + 7, bytes([raw[address + 7] ^ 0x80]))  # the address's top bit
    text = refused_row(tmp_path / "c", "img-4")
    assert str(shard) in text and "row 1" in text
    assert not verify_cache(tmp_path / "c", checksums=False).ok
    result = CliRunner().invoke(app, ["cache", "verify", str(tmp_path / "c"), "--no-checksums"])
    assert result.exit_code == 2 and "row 1" in result.output and "Traceback" not in result.output


def test_verify_with_checksums_names_the_damaged_row_and_exits_2(tmp_path):
    build(tmp_path / "c")
    shard = tmp_path / "c" / shard_name(1)
    with h5py.File(shard, "r") as f:
        row1 = f["data"].id.get_chunk_info(1).byte_offset
    raw = shard.read_bytes()
    patch(shard, row1 + 5, bytes([raw[row1 + 5] ^ 0x10]))
    report = verify_cache(tmp_path / "c")
    assert any("checksum mismatch" in p for p in report.problems)
    assert any(shard.name in p and "row 1" in p for p in report.problems), report.problems
    result = CliRunner().invoke(app, ["cache", "verify", str(tmp_path / "c")])
    assert result.exit_code == 2 and "row 1" in result.output


def test_a_shard_whose_metadata_lost_its_rows_says_metadata_is_damaged(tmp_path):
    build(tmp_path / "c")
    shard = tmp_path / "c" / shard_name(0)
    raw = shard.read_bytes()
    assert raw.count(b"data\x00") == 1
    patch(shard, raw.index(b"data\x00"), b"dbta")  # the root group's link name: 'data' no longer opens
    text = refused_row(tmp_path / "c", "img-0")
    assert str(shard) in text and "damaged metadata" in text and "the manifest says 3" in text
