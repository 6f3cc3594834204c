"""Atomic file writes: a file is visible under its name only once complete (temp, fsync, rename).

Writing faults (a full disk, a folder that is not writable) become one `BlitextError` line
naming the folder and what to do (`writing`), never a traceback.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from blitext.errors import BlitextError

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
RESUME = "run the same command again to resume"


def write_failure(folder: Path, e: OSError, then: str = RESUME) -> BlitextError:
    """The one line for an OSError met while writing under `folder`."""
    if e.errno in NO_SPACE:
        return BlitextError(f"no space left on the device holding {folder}: free some space there "
                            f"(or pass another --out), then {then}")
    if e.errno in NOT_WRITABLE:
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(folder) else ""
        return BlitextError(f"{folder} is not writable: {e.strerror or e}{where}; make it writable "
                            f"or pass another --out, then {then}")
    return BlitextError(f"writing in {folder} failed: {e.strerror or e}; check the disk, then {then}")


@contextlib.contextmanager
def writing(folder: Path, then: str = RESUME) -> Iterator[None]:
    """Turns an OSError raised inside into `write_failure`'s one line."""
    try:
        yield
    except OSError as e:
        raise write_failure(folder, e, then) from None


def check_out(out: str | Path | None, option: str = "--out") -> None:
    """Refuse, before any work starts, an output folder that cannot be one: a file at its path
    or above it, or a nearest existing folder that is not writable. Every phase calls this first,
    so an hour of work is never lost to a bad `--out` (None: the phase's default folder)."""
    if not out:
        return
    out = Path(out)
    existing = next(p for p in (out, *out.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        where = "is a file" if existing == out else f"lies under {existing}, which is a file"
        raise BlitextError(f"{option} {out} {where}: pass a folder (new, or one the same command wrote)")
    if not os.access(existing, os.W_OK | os.X_OK):  # root passes this; its writes still report EROFS
        raise BlitextError(f"{option} {out}: {existing} is not writable; make it writable or pass another {option}")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_file  # a folder's entries (renames) are made durable by fsyncing the folder itself


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, the folder last."""
    for path in sorted(Path(folder).rglob("*"), reverse=True):  # children before their folders
        fsync_file(path)
    fsync_file(folder)


def publish(tmp: Path, final: Path) -> None:
    """fsync `tmp`, rename it to `final`, fsync the folder so the rename survives a crash."""
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def aside_name(final: Path) -> Path:
    """Where `replace_folder` keeps the folder it replaces until the new one is in place."""
    return final.with_name(f".{final.name}.old")


def replace_folder(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` (fsynced) at `final`. An existing `final` is renamed
    aside first and deleted last, so a complete copy exists at every moment: under `final`,
    or (between the two renames) at `aside_name(final)`, which readers fall back to."""
    aside = aside_name(final)
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)  # left by an earlier crash; `final` is complete
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def remove_folder(folder: Path) -> None:
    """Delete a folder so that a kill midway never leaves a partial one under its name."""
    if not folder.exists():
        return
    doomed = folder.with_name(f".{folder.name}.del")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        publish(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk must not leave half a file behind
            tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (shards and weights can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
