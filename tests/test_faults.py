"""Faults (issue 11): damaged shards are refused on read, a full disk or an unwritable folder is one
line and resumes to the same bytes, checkpoints are swapped in atomically and refused when damaged,
and a cache of the wrong kind is named."""
from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import blitext.atomic
import blitext.cache.writer
from blitext.cache import CachePlan, FeatureCache, ShardWriter, finalize, pending_shards, start_or_resume
from blitext.cache.manifest import shard_name, sidecar_name
from blitext.cache.verify import cache_info, verify_cache
from blitext.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from blitext.cli.main import app
from blitext.console import rank_logger
from blitext.errors import BlitextError
from blitext.pformer.prompts import PromptCache
from conftest import make_llm_folder, make_vision_folder
from test_extract import shard_bytes, write_image_folder

BIN = Path(sys.executable).parent
PRODUCER = {"encoder": "enc", "fingerprint": "enc@0123"}


def build(root: Path, n: int = 6, shard_size: int = 3, kind: str = "image-features", producer=PRODUCER,
          shape=(4, 6), provenance=None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    rows = {f"img-{i}": rng.standard_normal(shape).astype(np.float16) for i in range(n)}
    plan = CachePlan(root, kind, producer, list(rows), shard_size, provenance=provenance or {})
    start_or_resume(plan)
    for s in pending_shards(plan):
        with ShardWriter(plan, s) as w:
            keys = plan.keys[plan.shard_range(s).start:plan.shard_range(s).stop]
            w.add(keys, np.stack([rows[k] for k in keys]))
    finalize(plan)
    return rows


def chunk_offsets(shard: Path) -> list[int]:
    with h5py.File(shard, "r") as f:
        found = []
        f["data"].id.chunk_iter(lambda info: found.append(info.byte_offset))
    return found


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    return " ".join(result.output.split())  # rich wraps long lines on narrow terminals


# ---------------------------------------------------------------- item 1: rows are checked on read

def test_a_flipped_byte_in_a_row_is_refused_on_read(tmp_path):
    rows = build(tmp_path / "c")
    shard = tmp_path / "c" / shard_name(1)
    flip_byte(shard, chunk_offsets(shard)[1] + 5)  # row 1 of shard 1 = img-4
    cache = FeatureCache(tmp_path / "c")
    for key in ("img-0", "img-3", "img-5"):
        assert np.array_equal(cache[key], rows[key])
    with pytest.raises(BlitextError) as e:
        cache.get_batch(["img-3", "img-4"])
    text = str(e.value)
    assert str(shard) in text and "row 1" in text and "'img-4'" in text
    assert "blitext cache verify" in text and sidecar_name(1) in text and "\n" not in text
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["row_checksum"] == "fletcher32" and all(s["row_checksum"] for s in manifest["shards"])
    with h5py.File(shard, "r") as f:
        assert f["data"].fletcher32 and f["data"].chunks == (1, 4, 6)  # one row per chunk: a checksum per row
    report = verify_cache(tmp_path / "c", checksums=False)  # without the sha256 the row checksum still tells
    assert any(shard.name in p and "row 1" in p and "Fletcher-32" in p for p in report.problems)


def test_a_checked_row_is_read_from_the_memory_map_afterwards(tmp_path):
    rows = build(tmp_path / "c", n=3)
    cache = FeatureCache(tmp_path / "c")
    assert np.array_equal(cache["img-1"], rows["img-1"])  # first read: through HDF5, checked
    reader = cache._shard(0)
    offsets = chunk_offsets(tmp_path / "c" / shard_name(0))
    assert [reader.start(r) for r in range(3)] == [-1, offsets[1], -1]  # only the checked row reads from the map
    assert np.array_equal(cache["img-1"], rows["img-1"])  # from the map


def strip_row_checksums(root: Path) -> None:
    """Rewrite a cache as blitext wrote it before rows carried checksums."""
    manifest = json.loads((root / "manifest.json").read_text())
    for entry in manifest["shards"]:
        path = root / entry["file"]
        with h5py.File(path, "r") as f:
            data, keys = f["data"][:], f["keys"][:]
        path.unlink()
        with h5py.File(path, "w", libver=("earliest", "v110")) as f:
            f.create_dataset("data", data=data, chunks=(1, *data.shape[1:]), track_times=False)
            f.create_dataset("keys", data=keys, dtype=h5py.string_dtype(), track_times=False)
        entry.pop("row_checksum")
        entry["bytes"], entry["sha256"] = path.stat().st_size, blitext.atomic.sha256_file(path)
    manifest.pop("row_checksum")
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_a_cache_written_before_row_checksums_stays_readable(tmp_path):
    rows = build(tmp_path / "c")
    strip_row_checksums(tmp_path / "c")
    cache = FeatureCache(tmp_path / "c")
    assert all(np.array_equal(cache[k], rows[k]) for k in rows)
    offsets = chunk_offsets(tmp_path / "c" / shard_name(0))
    assert [cache._shard(0).start(r) for r in range(3)] == offsets  # every row from the map, unchecked
    report = verify_cache(tmp_path / "c")
    assert report.ok and len(report.unchecked_shards) == 2
    assert "reads cannot check their rows" in report.notes[0] and "rebuild" in report.notes[0]
    assert cache_info(tmp_path / "c")["row_checksum"] is None
    result = CliRunner().invoke(app, ["cache", "verify", str(tmp_path / "c")])
    assert result.exit_code == 0 and "note" in result.output


# ---------------------------------------------------------------- item 2: damaged metadata

def test_damaged_hdf5_metadata_is_one_line(tmp_path):
    build(tmp_path / "c")
    shard = tmp_path / "c" / shard_name(0)
    raw = bytearray(shard.read_bytes())
    tree = raw.index(b"TREE\x01")  # the chunk index (a B-tree of type 1); h5py raised RuntimeError from chunk_iter
    raw[tree:tree + 16] = b"\xee" * 16
    shard.write_bytes(bytes(raw))
    with pytest.raises(BlitextError) as e:
        FeatureCache(tmp_path / "c")["img-0"]
    assert str(shard) in str(e.value) and "does not open as a cache shard" in str(e.value)
    assert "blitext cache verify" in str(e.value)
    assert not verify_cache(tmp_path / "c", checksums=False).ok


def test_a_truncated_shard_is_one_line(tmp_path):
    build(tmp_path / "c")
    shard = tmp_path / "c" / shard_name(1)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(BlitextError, match="truncated or replaced") as e:
        FeatureCache(tmp_path / "c")["img-4"]
    assert str(shard) in str(e.value)


# ---------------------------------------------------------------- items 3-5: full disk, unwritable folder

@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return make_vision_folder("vit", tmp_path_factory.mktemp("vision") / "vit")


def extract_args(data: Path, vit: Path, out: Path) -> list[str]:
    return ["extract-features", "--data", str(data), "--vision-encoder", str(vit), "--batch-size", "2",
            "--shard-size", "4", "--num-workers", "0", "--device", "cpu", "--out", str(out)]


class FullDisk:
    """Stands in for `open` in the cache writer: the files it opens take `budget` bytes in all,
    then every write fails with ENOSPC, as on a full disk."""

    def __init__(self, budget: int):
        self.budget = budget

    def __call__(self, path, mode="r", *args, **kw):
        return _OnDisk(open(path, mode, *args, **kw), self, path)


class _OnDisk:
    def __init__(self, f, disk: FullDisk, path):
        self.f, self.disk, self.path = f, disk, path

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.disk.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        self.disk.budget -= size
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_full_disk_during_extraction_is_one_line_and_resumes_to_the_same_bytes(tmp_path, vit, monkeypatch):
    data = write_image_folder(tmp_path / "imgs", 12)
    runner = CliRunner()
    fresh = runner.invoke(app, extract_args(data, vit, tmp_path / "fresh"))
    assert fresh.exit_code == 0, fresh.output
    one_shard = (tmp_path / "fresh" / shard_name(0)).stat().st_size
    full = FullDisk(int(1.5 * one_shard))  # the disk fills in the middle of the second shard
    monkeypatch.setattr(blitext.cache.writer, "open", full, raising=False)
    out = tmp_path / "out"
    text = one_line_error(runner.invoke(app, extract_args(data, vit, out)))
    assert f"no space left on the device holding {out}" in text and "run the same command again" in text
    assert not list(out.glob(".*tmp*")), "the temp shard is removed"
    assert (out / sidecar_name(0)).exists() and not (out / sidecar_name(1)).exists()
    monkeypatch.undo()  # space freed
    resumed = runner.invoke(app, extract_args(data, vit, out))
    assert resumed.exit_code == 0, resumed.output
    assert shard_bytes(out) == shard_bytes(tmp_path / "fresh")


def test_a_write_failing_below_python_does_not_crash(tmp_path, vit):
    """A real write failure inside HDF5's own I/O (the file-size limit stands in for a full disk:
    the writes fail with EFBIG): the process used to die with a segmentation fault (exit 139)."""
    data = write_image_folder(tmp_path / "imgs", 12)
    out = tmp_path / "out"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, 12_000))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(BIN / "blitext"), *extract_args(data, vit, out)], capture_output=True, text=True,
                          preexec_fn=limit_file_size, env=env, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and f"writing in {out} failed" in " ".join(proc.stderr.split())
    assert not list(out.glob(".*tmp*"))
    resumed = subprocess.run([str(BIN / "blitext"), *extract_args(data, vit, out)], capture_output=True, text=True,
                             env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert FeatureCache(out).keys == [f"img{i:03d}" for i in range(12)]


def refuse_writes_under(monkeypatch, folder: Path) -> None:
    """mkdir under `folder` fails as in a read-only folder (tests run as root, whom chmod does not stop)."""
    real = Path.mkdir

    def mkdir(self, *args, **kw):
        if self == folder or folder in self.parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *args, **kw)
    monkeypatch.setattr(Path, "mkdir", mkdir)


def test_an_unwritable_cache_folder_is_one_line(tmp_path, vit, monkeypatch):
    data = write_image_folder(tmp_path / "imgs", 4)
    locked = tmp_path / "locked"
    refuse_writes_under(monkeypatch, locked)
    text = one_line_error(CliRunner().invoke(app, extract_args(data, vit, locked / "cache")))
    assert f"{locked / 'cache'} is not writable" in text and "another --out" in text


def test_an_unwritable_log_folder_is_one_line(tmp_path, monkeypatch):
    refuse_writes_under(monkeypatch, tmp_path / "run" / "logs")
    with pytest.raises(BlitextError, match="is not writable"):
        rank_logger("extract", tmp_path / "run" / "logs")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 0o555 folder anyway; the injected "
                                               "PermissionError test above covers it")
def test_a_read_only_folder_is_one_line(tmp_path, vit):
    data = write_image_folder(tmp_path / "imgs", 4)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        text = one_line_error(CliRunner().invoke(app, extract_args(data, vit, locked / "cache")))
        assert "is not writable" in text
    finally:
        locked.chmod(0o755)


# ---------------------------------------------------------------- item 6: checkpoints and --out files

def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def test_checkpoint_files_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or real_replace(a, b))
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    final = save_checkpoint(tmp_path, 1, model, optimizer, {"config": {}})
    swap = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final))
    synced = {Path(e[1]).name for e in events[:swap] if e[0] == "fsync"}
    assert {"model.safetensors", "optimizer.pt", "state.json", events[swap][1].split("/")[-1]} <= synced


def test_resaving_a_step_always_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    save_checkpoint(tmp_path, 2, model, None, {"v": 1})
    real_replace, seen = os.replace, []

    def replace(a, b):
        found = latest_checkpoint(tmp_path)  # what a reader (or a resume after a kill right here) finds
        seen.append(found is not None and (found / "model.safetensors").is_file())
        return real_replace(a, b)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(tmp_path, 2, model, None, {"v": 2})
    assert len(seen) >= 3 and all(seen)  # (state.json,) set aside, swap in, point `latest`

    def killed_between_the_renames(a, b):
        if Path(a).name.startswith(".step-0000002.tmp"):
            raise KeyboardInterrupt  # as a kill after the old folder was set aside
        return real_replace(a, b)
    monkeypatch.setattr(os, "replace", killed_between_the_renames)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, None, {"v": 3})
    monkeypatch.undo()
    found = latest_checkpoint(tmp_path)
    assert found is not None and load_checkpoint(found, tiny_model())["v"] == 2
    save_checkpoint(tmp_path, 3, model, None, {"v": 4})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-0000002", "step-0000003"]


def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, 1, model, optimizer, {})
    second = save_checkpoint(tmp_path, 2, model, optimizer, {})
    weights = second / "model.safetensors"
    flip_byte(weights, weights.stat().st_size - 3)  # inside a tensor: safetensors itself would load it
    with pytest.raises(BlitextError) as e:
        load_checkpoint(second, tiny_model(), torch.optim.AdamW(tiny_model().parameters()))
    assert str(second) in str(e.value) and "sha256" in str(e.value)
    assert "--resume " + str(tmp_path / "checkpoints" / "step-0000001") in str(e.value)
    (second / "state.json").write_text("{")  # a damaged state.json
    with pytest.raises(BlitextError, match="state.json"):
        load_checkpoint(second, tiny_model())


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_one(tmp_path, monkeypatch):
    model = tiny_model()
    save_checkpoint(tmp_path, 1, model, None, {})

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(BlitextError, match=f"no space left on the device holding {tmp_path}.*--resume latest"):
        save_checkpoint(tmp_path, 2, model, None, {})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step-0000001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-0000001"]


def test_check_prompts_out_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    llm = make_llm_folder("opt", tmp_path / "opt")
    producer = {"pformer": "p@1", "llm": "opt@1", "store": "full", "n_prompt": 2, "d_llm": 32}
    build(tmp_path / "prompts", n=4, kind="prompts", producer=producer, shape=(2, 32), provenance={"llm": str(llm)})
    out = tmp_path / "report.json"
    out.write_text("the previous report")
    args = ["check-prompts", "--prompts", str(tmp_path / "prompts"), "--out", str(out)]

    def full(tmp, final):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    monkeypatch.setattr(blitext.atomic, "publish", full)
    text = one_line_error(CliRunner().invoke(app, args))
    assert f"no space left on the device holding {tmp_path}" in text
    assert out.read_text() == "the previous report" and not list(tmp_path.glob(".report.json.tmp*"))
    monkeypatch.undo()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["n_vectors"] == 4 * 2


# ---------------------------------------------------------------- item 7: a cache of the wrong kind

def test_a_prompt_cache_given_as_features_is_named(tmp_path):
    producer = {"pformer": "p@1", "llm": "opt@1", "store": "full", "n_prompt": 2, "d_llm": 8}
    build(tmp_path / "prompts", kind="prompts", producer=producer, shape=(2, 8))
    result = CliRunner().invoke(app, ["train-adapter", "--stage", "1", "--features", str(tmp_path / "prompts"),
                                      "--w-align", "0", "--device", "cpu"])
    text = one_line_error(result)
    assert f"{tmp_path / 'prompts'} is a prompt cache (made by build-prompts)" in text
    assert "--features wants a feature cache (made by extract-features" in text

    build(tmp_path / "features")
    with pytest.raises(BlitextError, match="is an image-feature cache .*--prompts wants a prompt cache"):
        PromptCache(tmp_path / "features")
