"""read_pairs' columns written once to files under the cache root and memory-mapped read-only.

Every torchrun rank used to parse the caption files into its own columns (~135 bytes and ~9 us
of CPU per caption: 18 GB and 20 minutes per rank at BLIP-2's 129M captions). Here one process
parses and writes `<cache root>/pairs/<fingerprint>/`, and every rank (and its forked workers)
maps the files: the page cache holds them once per machine, and a rank's own memory for the
pairs no longer grows with captions.

The folder holds each column as keyindex.py holds keys (a UTF-8 `.bin` blob and `.npy`
offsets), the per-caption image numbers and k, and `pairs.json`, written last, whose presence
says the rest is complete (it records every file's size). The folder is built under a temporary
name and renamed into place, so a killed writer leaves nothing a later run reads as complete.
The fingerprint is of what decides the columns: each caption file's path, size and mtime_ns,
the image root, and which ids have features (`accepts`): a changed input is a new folder.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch.distributed as dist

from blitext.atomic import fsync_tree, read_json, remove_folder, write_json
from blitext.cache.keyindex import _map  # a whole file mapped read-only, as the key index maps keys.bin
from blitext.config import default_cache_root
from blitext.console import say
from blitext.data.columns import GatherColumn, ImageRefs, KeyColumn, StringColumn
from blitext.data.pairs import Pairs
from blitext.distributed import dist_info
from blitext.errors import BlitextError

FORMAT = "blitext-pairs/1"
MARKER = "pairs.json"  # written last: its presence says the folder is complete
STRINGS = ("texts", "ids", "refs")  # each a <name>.bin blob and <name>.npy offsets
ARRAYS = ("image_index", "k")
FILES = tuple(f"{s}.bin" for s in STRINGS) + tuple(f"{a}.npy" for a in (*STRINGS, *ARRAYS))
WAIT = timedelta(hours=6)  # how long ranks wait for the parsing rank (~20 min at 129M captions)


def inputs(paths: list[Path], image_root: str | None, accepts: str) -> dict:
    """What decides the columns: their folder's name hashes it, and pairs.json records it."""
    files = []
    for p in paths:
        st = p.stat()
        files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    # `accepts` (which ids have features) is keyed in and only kept captions stored, rather than all
    # captions and a mask made each run: a mask would cost every rank bytes and a lookup per caption
    return {"format": FORMAT, "files": files, "accepts": accepts,
            "image_root": str(Path(image_root).resolve()) if image_root else None}


def pairs_folder(made_from: dict) -> Path:
    """`<cache root>/pairs/<fingerprint of the inputs>`."""
    text = json.dumps(made_from, sort_keys=True)
    return default_cache_root() / "pairs" / hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


# ---------------------------------------------------------------- writing

def write_pairs(folder: Path, pairs: Pairs, made_from: dict) -> None:
    """The columns of `pairs` (read_pairs' in-memory ones) into `folder`, complete or not at all."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        ids, refs = pairs.image_refs.ids, pairs.image_refs.refs
        for name, column in zip(STRINGS, (pairs.texts, ids, refs)):
            with open(tmp / f"{name}.bin", "wb") as f:
                f.write(column.blob)
            np.save(tmp / f"{name}.npy", np.asarray(column.offsets))
        np.save(tmp / "image_index.npy", np.asarray(pairs.image_ids.index))
        np.save(tmp / "k.npy", np.asarray(pairs.keys.k))
        write_json(tmp / MARKER, {**_counts(pairs), "made_from": made_from,
                                  "bytes": {name: (tmp / name).stat().st_size for name in FILES}})
        fsync_tree(tmp)
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _counts(pairs: Pairs) -> dict:
    refs = pairs.image_refs
    return {"format": FORMAT, "captions": len(pairs), "images": len(refs.ids), "skipped": pairs.skipped,
            "blank": pairs.blank, "no_caption": pairs.no_caption,
            # absolute: a later run from another working directory finds the same images
            "roots": [os.path.abspath(r) for r in refs.roots], "file_starts": list(refs.file_starts)}


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the finished `tmp` to `folder`; an incomplete `folder` is removed first. Another
    writer that got there first (a node of a shared cache root) wrote the same bytes: keep its."""
    if folder.exists() and problem(folder) is not None:
        remove_folder(folder)
    try:
        os.rename(tmp, folder)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise


def _remove_dead_writers(folder: Path) -> None:
    """Temporary folders of writers on this machine that were killed (an 18 GB folder at 129M captions)."""
    host = socket.gethostname()
    for tmp in folder.parent.glob(f".{folder.name}.tmp-{host}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


# ---------------------------------------------------------------- reading

def problem(folder: Path) -> str | None:
    """Why `folder` is not a complete set of columns (then it is rebuilt), or None."""
    marker = folder / MARKER
    if not marker.is_file():
        return f"{MARKER} is missing" if folder.exists() else "it does not exist"
    try:
        meta = read_json(marker)
    except (OSError, ValueError):
        return f"{MARKER} cannot be read"
    if meta.get("format") != FORMAT:
        return f"its format is {meta.get('format')!r}, not {FORMAT!r}"
    for name in FILES:
        path, size = folder / name, meta.get("bytes", {}).get(name)
        if size is None:
            return f"{MARKER} lists no {name}"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size:,} bytes, {MARKER} says {size:,}"
    return None


def open_pairs(folder: Path) -> Pairs:
    """The columns in a complete `folder` (problem() is None), memory-mapped: nothing is read."""
    meta = read_json(folder / MARKER)
    texts, ids, refs = (StringColumn(_map(folder / f"{name}.bin"), _load(folder / f"{name}.npy")) for name in STRINGS)
    image_index, k = _load(folder / "image_index.npy"), _load(folder / "k.npy")
    for column, count, name in ((texts, meta["captions"], "texts"), (ids, meta["images"], "ids"),
                                (refs, meta["images"], "refs")):
        if len(column) != count or (count and int(column.offsets[-1]) != len(column.blob)):
            raise _damaged(folder, f"{name}.npy does not match {name}.bin")
    if len(image_index) != meta["captions"] or len(k) != meta["captions"]:
        raise _damaged(folder, f"image_index.npy or k.npy does not hold {meta['captions']:,} captions")
    image_ids = GatherColumn(ids, image_index)
    image_refs = ImageRefs(ids, refs, image_index, [Path(r) for r in meta["roots"]], meta["file_starts"])
    return Pairs(KeyColumn(image_ids, k), image_ids, texts, image_refs, meta["skipped"], meta["blank"],
                 meta["no_caption"], folder)


def _damaged(folder: Path, what: str) -> BlitextError:
    return BlitextError(f"the caption columns in {folder} are damaged ({what}): delete that folder and run "
                        f"again (they are rebuilt from the caption files)")


def _load(path: Path) -> np.ndarray:
    try:
        try:
            return np.load(path, mmap_mode="r")
        except ValueError:  # numpy cannot map an empty array's zero data bytes; a damaged file fails again below
            return np.load(path)
    except (ValueError, OSError, EOFError) as e:
        raise _damaged(path.parent, f"{path.name}: {e}") from None


# ---------------------------------------------------------------- one parse per machine

def _pair_count(pairs: Pairs) -> str:
    return f"{len(pairs):,} pairs"


def stored_pairs(made_from: dict, parse: Callable[[], Pairs], counted: Callable[[Pairs], str] = _pair_count) -> Pairs:
    """The columns of these inputs (`inputs()`) mapped from their folder, which the first process
    to need them parses and writes.

    Under torchrun, rank 0 builds while the others wait; a node that does not see its folder
    (a node-local cache root) has its local rank 0 build its own. Where the folder cannot be
    written, the columns stay in memory, as in every rank before this store. `counted(pairs)`
    says what the columns hold in the messages."""
    folder = pairs_folder(made_from)
    info = dist_info()
    if info.world == 1 or not dist.is_initialized():
        return _open_or_build(folder, parse, made_from, counted)
    # a group of its own to wait in: the default group's timeout (NCCL's 10 min) may be shorter than a parse
    group = dist.new_group(backend="gloo", timeout=WAIT)
    try:
        pairs = _open_or_build(folder, parse, made_from, counted) if info.rank == 0 else None
        dist.barrier(group=group)
        if info.rank != 0 and info.local_rank == 0:
            pairs = _open_or_build(folder, parse, made_from, counted)
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)
    if pairs is None:  # the folder its builder wrote, or in memory where that builder could not write
        pairs = open_pairs(folder) if problem(folder) is None else parse()
    return pairs


def _open_or_build(folder: Path, parse: Callable[[], Pairs], made_from: dict, counted) -> Pairs:
    why = problem(folder)
    if why is None:
        pairs = open_pairs(folder)
        say(f"caption columns of {counted(pairs)} reused from {folder} (the caption files are unchanged)",
            soft_wrap=True)
        return pairs
    if folder.exists():
        say(f"caption columns in {folder} are incomplete ({why}): parsing the caption files again", soft_wrap=True)
    pairs = parse()
    try:
        write_pairs(folder, pairs, made_from)
    except OSError as e:
        say(f"caption columns kept in this process's memory: {folder} cannot be written "
            f"({e.strerror or e}); make the cache root ($BLITEXT_CACHE) writable to share them between ranks",
            soft_wrap=True)
        return pairs
    say(f"caption columns of {counted(pairs)} written to {folder}, mapped by every rank; a later run "
        f"with the same caption files and features reuses them", soft_wrap=True)
    return open_pairs(folder)
