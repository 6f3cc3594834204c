"""`blitext import-features`: released per-video features (.npy) into a blitext feature cache.

VATEX ships its I3D features as one `<videoID>.npy` per video, shape (1, T, 1024). Importing
them gives the same cache extract-features writes for video (variable-length rows (T_i, D),
read back zero-padded with a mask), so train-adapter cannot tell them apart except by the
producer, which records that they were imported, from which folder, and the encoder the
user declares. A file that does not fit (unreadable, wrong rank, empty, other width, NaN) is
reported by name with a reason and the rest are imported.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blitext.atomic import check_out
from blitext.cache import CachePlan, ShardWriter
from blitext.cache.jobs import run_sharded_job
from blitext.cache.verify import cache_info
from blitext.config import default_cache_root, provenance
from blitext.console import RateLimitedWarnings, progress_bar, rank_logger, say
from blitext.data.video import sample_evenly
from blitext.distributed import DistInfo
from blitext.errors import BadInputError, BlitextError, first_line
from blitext.features.image import print_failures

KIND = "video-features"


@dataclass
class ImportConfig:
    folder: str = ""                      # folder of <video id>.npy files, each (1, T, D) or (T, D)
    out: str | None = None                # cache folder; default <cache root>/features/<folder name>__<encoder>
    encoder: str = "i3d-vatex"            # what made the features (recorded; caches of other encoders are refused)
    # The caption JSON these videos belong to (VATEX or LAVIS); named `data` as in extract-features so
    # train-adapter finds the captions from the cache the same way. Only checked against the ids here.
    data: str | None = None
    max_segments: int = 32                # paper: up to 32; longer rows keep 32 sampled evenly, as extraction does
    shard_size: int = 1024                # videos per shard
    dtype: str = "float16"                # stored dtype

    def __post_init__(self) -> None:
        if self.max_segments < 1:
            raise BlitextError(f"max_segments must be at least 1, got {self.max_segments}")


def npy_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise BlitextError(f"{folder} is not a folder; pass the folder holding one <video id>.npy per video")
    files = sorted(folder.rglob("*.npy"), key=lambda p: p.as_posix())
    if not files:
        raise BlitextError(f"{folder} holds no .npy files; expected one <video id>.npy per video (VATEX's I3D release)")
    return files


def video_key(folder: Path, file: Path) -> str:
    """The video id: the file name without .npy (and its sub-folder, if the release nests them)."""
    return file.relative_to(folder).with_suffix("").as_posix()


def load_segments(file: Path, name: str, max_segments: int) -> np.ndarray:
    """(T, D) float32 from a (1, T, D) or (T, D) array; T > max_segments sampled evenly; BadInputError otherwise."""
    array = _open_npy(file, name, mmap=False)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise BadInputError(f"{name}: shape {array.shape}; expected (1, T, D) or (T, D)")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise BadInputError(f"{name}: shape {array.shape} holds no segments")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise BadInputError(f"{name}: dtype {array.dtype} is not real numbers")
    if not np.isfinite(array).all():
        raise BadInputError(f"{name}: holds NaN or inf values")
    return array[sample_evenly(len(array), max_segments)].astype(np.float32)


def _open_npy(file: Path, name: str, mmap: bool) -> np.ndarray:
    try:
        with open(file, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":
            raise BadInputError(f"{name}: not a .npy file (starts {magic!r})")
        # a pickled (object) .npy could run code when loaded: refused
        return np.load(file, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as e:
        raise BadInputError(f"{name}: not a readable .npy array ({first_line(e, 100)})") from None


def common_width(files: list[Path], folder: Path) -> int:
    """The D most files have, from their headers alone (memory-mapped, no data read): files of
    another width are then reported one by one instead of deciding the cache's width."""
    widths = collections.Counter()
    for f in files:
        try:
            shape = _open_npy(f, f.name, mmap=True).shape
        except BadInputError:
            continue
        if len(shape) in (2, 3) and shape[-1] > 0:
            widths[shape[-1]] += 1
    if not widths:
        raise BlitextError(f"none of the {len(files)} .npy files in {folder} is a (1, T, D) or (T, D) feature array")
    return widths.most_common(1)[0][0]


def import_features(config: ImportConfig) -> dict:
    """Import (or resume importing) a folder of .npy features; returns the cache summary."""
    check_out(config.out)
    folder = Path(config.folder).expanduser()
    files = npy_files(folder)
    keys = [video_key(folder, f) for f in files]
    out = Path(config.out) if config.out else default_cache_root() / "features" / f"{folder.name}__{config.encoder}"
    width = common_width(files, folder)
    producer = {"modality": "video", "encoder": config.encoder, "fingerprint": f"{config.encoder}@imported",
                "source": "imported", "folder": str(folder.resolve()), "max_segments": config.max_segments,
                "long_videos": "sample segments evenly"}
    _check_caption_ids(config.data, set(keys))
    say(f"import-features: {len(files):,} .npy files (width {width}) -> {out} as {config.encoder}")
    plan = CachePlan(out, KIND, producer, keys, config.shard_size, config.dtype, variable_length=True,
                     provenance=provenance(config))

    def write_shards(shards: list[int], finished: int) -> None:
        if finished:
            say(f"resuming: {finished} finished shard(s) kept, {len(shards)} to do")
        warnings = RateLimitedWarnings(rank_logger("import", out / "logs"))
        with progress_bar(len(files), "import-features", "file") as advance:
            for s in shards:
                _write_shard(plan, s, files, width, config.max_segments, warnings)
                advance(len(plan.shard_range(s)))

    run_sharded_job(plan, DistInfo(0, 1, 0), write_shards)  # reading .npy files is I/O: one process is enough
    summary = cache_info(out)
    print_failures(summary["failures"])
    return summary


def _write_shard(plan: CachePlan, s: int, files: list[Path], width: int, max_segments: int, warnings) -> None:
    with ShardWriter(plan, s) as writer:
        for i in plan.shard_range(s):
            name = files[i].name
            try:
                row = load_segments(files[i], name, max_segments)
                if row.shape[1] != width:
                    raise BadInputError(f"{name}: width {row.shape[1]}, but the other files have {width}")
            except BadInputError as e:
                writer.fail(plan.keys[i], str(files[i]), str(e))
                warnings.warn(str(e))
                continue
            writer.add([plan.keys[i]], [row])


def _check_caption_ids(data: str | None, keys: set[str]) -> None:
    """Say how many captioned videos have no features (VATEX lists videos that left YouTube)."""
    if not data:
        return
    from blitext.data.readers import read_image_set

    ids = {r.id for r in read_image_set(data).records}
    missing = len(ids - keys)
    if not ids & keys:
        raise BlitextError(f"no video id in {data} has a .npy file (e.g. {sorted(ids)[:1]} vs {sorted(keys)[:1]}); "
                           f"is it the caption file of these features?")
    if missing:
        say(f"[yellow]{missing} of {len(ids)} captioned videos in {data} have no .npy file[/] (train-adapter skips them)")
