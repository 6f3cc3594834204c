"""Rows are checked on their first read against the Fletcher-32 checksum HDF5 stored with them,
computed by blitext from the memory-mapped bytes, so a shard's HDF5 file can be closed once its
chunk index is read (an open HDF5 file holds 0.5-1 MB in every process)."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from blitext.cache import FeatureCache
from blitext.cache import shard as shard_module
from blitext.cache.shard import fletcher32_values
from blitext.errors import BlitextError
from tests.test_cache import build, random_rows


def stored_checksums(tmp_path, rows: list[np.ndarray]) -> list[tuple[bytes, int]]:
    """Each row's bytes as HDF5 wrote its chunk, and the checksum HDF5 stored after them."""
    path = tmp_path / "rows.h5"
    with h5py.File(path, "w") as f:
        for i, row in enumerate(rows):
            f.create_dataset(f"d{i}", data=row[None], chunks=(1, *row.shape), fletcher32=True)
    raw, out = path.read_bytes(), []
    with h5py.File(path, "r") as f:
        for i in range(len(rows)):
            info = f[f"d{i}"].id.get_chunk_info(0)
            chunk = raw[info.byte_offset:info.byte_offset + info.size]
            out.append((chunk[:-4], int.from_bytes(chunk[-4:], "little")))
    return out


def varied_rows() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    rows = []
    for size in (1, 3, 64, 721, 4_000):  # odd byte counts take HDF5's last-byte step
        rows += [rng.integers(0, 256, size, dtype=np.uint8), np.zeros(size, np.uint8),
                 np.full(size, 255, np.uint8)]  # sums that are multiples of 65535: written as 0xffff
    rows.append(rng.standard_normal((257, 64)).astype(np.float16))
    return rows


def test_fletcher32_is_the_checksum_hdf5_stores(tmp_path):
    for data, stored in stored_checksums(tmp_path, varied_rows()):
        assert fletcher32_values(np.frombuffer(data, np.uint8))[0] == stored


def test_fletcher32_sums_long_rows_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_module, "FLETCHER_BLOCK", 7)  # every row spans several blocks, some partial
    for data, stored in stored_checksums(tmp_path, varied_rows()):
        assert fletcher32_values(np.frombuffer(data, np.uint8))[0] == stored


def test_a_fixed_row_shard_closes_its_hdf5_file_and_still_checks_rows(tmp_path):
    rows = random_rows(6)
    build(tmp_path / "c", rows)
    open_files = h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE)
    cache = FeatureCache(tmp_path / "c")
    assert np.array_equal(cache["img-4"], rows["img-4"]) and np.array_equal(cache["img-0"], rows["img-0"])
    assert h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE) == open_files
    shard = cache._files[1]
    assert shard.start(1) >= 0 and shard.start(0) == -1  # read from the map once checked
    start, path = shard.places[2], tmp_path / "c" / cache.manifest["shards"][1]["file"]
    cache.close()
    data = bytearray(path.read_bytes())
    data[start + 3] ^= 0x01  # one bit of img-5
    path.write_bytes(bytes(data))
    cache = FeatureCache(tmp_path / "c")
    assert np.array_equal(cache["img-3"], rows["img-3"])
    with pytest.raises(BlitextError, match="row 2 .*Fletcher-32"):
        cache["img-5"]
