"""Columns parsed once per machine into files under the cache root and memory-mapped read-only.

Every torchrun rank used to parse its inputs into columns of its own (read_pairs' captions,
train-pformer's sentences): gigabytes per rank at the papers' sizes. Here one process parses
and writes `<cache root>/<kind>/<fingerprint>/`, and every rank (and its forked workers) maps the
files: the page cache holds them once per machine, and a rank's own memory for the columns no
longer grows with rows.

A `Store` says what one kind of folder holds; this module builds, checks, publishes and shares
it, the same for every kind (pair_store.py, sentence_store.py). A folder is built under a
temporary name and renamed into place, and its marker json, written last, records every file's
size: a killed writer leaves nothing a later run reads as complete, and temporary folders of
writers that are gone are removed. The fingerprint is of what decides the columns (each input
file's path, size and mtime_ns, and the options): a changed input is a new folder. Where the
cache root cannot be written, the columns stay in the process's memory, said in one line.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import torch.distributed as dist

from blitext.atomic import fsync_tree, read_json, remove_folder, write_json
from blitext.cache.keyindex import _load, _map  # files mapped read-only as the key index maps its own
from blitext.config import default_cache_root
from blitext.console import say
from blitext.data.columns import StringColumn
from blitext.distributed import dist_info, in_turn
from blitext.errors import BlitextError

T = TypeVar("T")
WAIT = timedelta(hours=6)  # how long ranks wait for the parsing rank (~20 min at 129M captions)


@dataclass(frozen=True)
class Store(Generic[T]):
    """One kind of stored columns: its folder, its files, how they are written and mapped, and
    what the messages call them."""
    kind: str                             # the folder under the cache root
    format: str                           # recorded in the marker: another format is rebuilt
    marker: str                           # written last: its presence says the folder is complete
    files: tuple[str, ...]                # every file the marker records the size of
    fill: Callable[[Path, T], dict]       # writes the columns' files into a folder; returns the marker's fields
    open: Callable[[Path], T]             # the columns of a complete folder, mapped
    columns: str                          # "caption columns"
    sources: str                          # "caption files": what they are parsed from
    same: str                             # what a later run shares to reuse them: "caption files and features"

    def folder(self, made_from: dict) -> Path:
        """`<cache root>/<kind>/<fingerprint of the inputs>`."""
        text = json.dumps(made_from, sort_keys=True)
        return default_cache_root() / self.kind / hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def file_facts(paths: list[Path]) -> list[list]:
    """Each input file's resolved path, size and mtime_ns: what a fingerprint keys a file by."""
    facts = []
    for p in paths:
        st = p.stat()
        facts.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return facts


# ---------------------------------------------------------------- writing

def write(store: Store[T], folder: Path, columns: T, made_from: dict) -> None:
    """`columns` into `folder`, complete or not at all."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fields = store.fill(tmp, columns)
        write_json(tmp / store.marker, {**fields, "format": store.format, "made_from": made_from,
                                        "bytes": {name: (tmp / name).stat().st_size for name in store.files}})
        fsync_tree(tmp)
        _publish(store, tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_strings(folder: Path, name: str, column: StringColumn) -> None:
    """A string column as `<name>.bin` (its UTF-8 blob) and `<name>.npy` (its offsets)."""
    with open(folder / f"{name}.bin", "wb") as f:
        f.write(column.blob)
    np.save(folder / f"{name}.npy", np.asarray(column.offsets))


def _publish(store: Store, tmp: Path, folder: Path) -> None:
    """Rename the finished `tmp` to `folder`; an incomplete `folder` is removed first. Another
    writer that got there first (a node of a shared cache root) wrote the same bytes: keep its."""
    if folder.exists() and problem(store, folder) is not None:
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

def problem(store: Store, folder: Path) -> str | None:
    """Why `folder` is not a complete set of columns (then it is rebuilt), or None."""
    marker = folder / store.marker
    if not marker.is_file():
        return f"{store.marker} is missing" if folder.exists() else "it does not exist"
    try:
        meta = read_json(marker)
    except (OSError, ValueError):
        return f"{store.marker} cannot be read"
    if meta.get("format") != store.format:
        return f"its format is {meta.get('format')!r}, not {store.format!r}"
    for name in store.files:
        path, size = folder / name, meta.get("bytes", {}).get(name)
        if size is None:
            return f"{store.marker} lists no {name}"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size:,} bytes, {store.marker} says {size:,}"
    return None


def open_strings(store: Store, folder: Path, name: str, count: int) -> StringColumn:
    """The mapped string column `name` of `folder`, which the marker says holds `count` strings."""
    column = StringColumn(_map(folder / f"{name}.bin"), load(store, folder / f"{name}.npy"))
    if len(column) != count or (count and int(column.offsets[-1]) != len(column.blob)):
        raise damaged(store, folder, f"{name}.npy does not match {name}.bin")
    return column


def load(store: Store, path: Path) -> np.ndarray:
    """A .npy file of a store's folder, memory-mapped."""
    try:
        return _load(path)  # keyindex's: mapped, or read where empty (a damaged file fails again there)
    except (ValueError, OSError, EOFError) as e:
        raise damaged(store, path.parent, f"{path.name}: {e}") from None


def damaged(store: Store, folder: Path, what: str) -> BlitextError:
    return BlitextError(f"the {store.columns} in {folder} are damaged ({what}): delete that folder and run "
                        f"again (they are rebuilt from the {store.sources})")


# ---------------------------------------------------------------- one parse per machine

def stored(store: Store[T], made_from: dict, parse: Callable[[], T], counted: Callable[[T], str]) -> T:
    """The columns of these inputs mapped from their folder, which the first process to need
    them parses and writes.

    Under torchrun, rank 0 builds while the others wait; a node that does not see its folder
    (a node-local cache root) has its local rank 0 build its own. Where the folder cannot be
    written, the columns stay in memory, as in every rank before the stores. `counted(columns)`
    says what the columns hold in the messages."""
    folder = store.folder(made_from)
    info = dist_info()
    if info.world == 1 or not dist.is_initialized():
        return _open_or_build(store, folder, parse, made_from, counted)
    # a group of its own to wait in: the default group's timeout (NCCL's 10 min) may be shorter than a parse
    group = dist.new_group(backend="gloo", timeout=WAIT)

    def build() -> T:
        return _open_or_build(store, folder, parse, made_from, counted)

    try:
        reading = f"reading the {store.sources}"
        columns = in_turn(build if info.rank == 0 else None, reading, group)
        other = in_turn(build if info.rank != 0 and info.local_rank == 0 else None, reading, group)
        columns = other if other is not None else columns
    finally:
        dist.destroy_process_group(group)
    if columns is None:  # the folder its builder wrote, or in memory where that builder could not write
        columns = store.open(folder) if problem(store, folder) is None else parse()
    return columns


def _open_or_build(store: Store[T], folder: Path, parse: Callable[[], T], made_from: dict, counted) -> T:
    why = problem(store, folder)
    if why is None:
        columns = store.open(folder)
        say(f"{store.columns} of {counted(columns)} reused from {folder} (the {store.sources} are unchanged)",
            soft_wrap=True)
        return columns
    if folder.exists():
        say(f"{store.columns} in {folder} are incomplete ({why}): parsing the {store.sources} again", soft_wrap=True)
    columns = parse()
    try:
        write(store, folder, columns, made_from)
    except OSError as e:
        say(f"{store.columns} kept in this process's memory: {folder} cannot be written "
            f"({e.strerror or e}); make the cache root ($BLITEXT_CACHE) writable to share them between ranks",
            soft_wrap=True)
        return columns
    say(f"{store.columns} of {counted(columns)} written to {folder}, mapped by every rank; a later run "
        f"with the same {store.same} reuses them", soft_wrap=True)
    return store.open(folder)
