"""What the caption and VQA readers share: image references checked against the dataset root,
captions grouped per image, every bad row of a file collected, JSON loaded with errors that name
the file."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from blitext.console import say
from blitext.data.records import ImageRecord
from blitext.errors import BlitextError


class _RefChecker:
    """Normalises image references and refuses any that would leave the dataset root.

    Checking each reference whole (pathlib, and os.path.realpath: a system call per path
    component) cost more per entry the longer the file (10^6 captions: 4x the time per entry of
    10^4). So a folder is resolved once, with the names of the symlinks it holds: a plain name
    in a folder known to be inside the root, and not a symlink there, is inside the root too.
    Anything else is checked whole."""

    def __init__(self, root: Path):
        self.root = root
        self.root_real = os.path.realpath(root)
        self._resolved: dict[PurePosixPath, tuple[str, frozenset[str]]] = {}  # folder -> (real path, its symlinks)
        self._inside: dict[str, tuple[str, frozenset[str]]] = {}  # "folder/" as written -> (normalised, its symlinks)

    def __call__(self, ref: Any, where: str) -> str:
        if not isinstance(ref, str) or not ref.strip():
            raise BlitextError(f"{where}: image path must be a non-empty string, got {ref!r}; fix the file")
        file_part = _tar_part(ref) or ref
        return (self._in_known_folder(file_part) or self._checked(ref, file_part, where)) + ref[len(file_part):]

    def _in_known_folder(self, file_part: str) -> str | None:
        """The normalised reference when its folder was found inside the root and its name is plain."""
        folder, slash, name = file_part.rpartition("/")
        known = self._inside.get(folder + slash)
        # ':' and '\\' could make a Windows drive of a name at the top: those are checked whole
        if known is None or name in ("", ".", "..") or ":" in name or "\\" in name or name in known[1]:
            return None
        return name if known[0] == "." else f"{known[0]}/{name}"

    def _checked(self, ref: str, file_part: str, where: str) -> str:
        pure = PurePosixPath(file_part)
        if pure.is_absolute() or PureWindowsPath(file_part).drive:
            raise BlitextError(f"{where}: image path {ref!r} is absolute; write it relative to the dataset "
                               f"root {self.root} (or pass image_root= the folder it is relative to)")
        if ".." in pure.parts:
            raise BlitextError(f"{where}: image path {ref!r} leaves the dataset root {self.root} via '..'; "
                               f"write it relative to the root (or pass image_root= a folder above it)")
        real_folder, links = self._resolve(pure.parent)
        real = os.path.realpath(self.root / pure) if pure.name in links else os.path.join(real_folder, pure.name)
        if not self._within_root(real):
            raise BlitextError(f"{where}: image path {ref!r} is a symlink out of the dataset root {self.root} "
                               f"(to {real}); pass image_root= a folder holding the real files, or copy them in")
        folder, slash, _name = file_part.rpartition("/")
        if self._within_root(real_folder) and ":" not in folder and "\\" not in folder:
            self._inside[folder + slash] = (pure.parent.as_posix(), links)
        return pure.as_posix()

    def _within_root(self, real: str) -> bool:
        return real == self.root_real or real.startswith(self.root_real + os.sep)

    def _resolve(self, folder: PurePosixPath) -> tuple[str, frozenset[str]]:
        """(the folder's real path, the names of the symlinks in it); a missing folder holds none."""
        if folder not in self._resolved:
            path = self.root / folder
            try:
                with os.scandir(path) as entries:
                    links = frozenset(e.name for e in entries if e.is_symlink())
            except OSError:
                links = frozenset()
            self._resolved[folder] = (os.path.realpath(path), links)
        return self._resolved[folder]


class _BadRows:
    """Every bad row of one file in one pass: each row's one-line error is kept and the reading
    goes on; `done()` then stops the run, listing them all (one bad row: its own line)."""

    def __init__(self, path: Path):
        self.path, self.errors = path, []

    @contextlib.contextmanager
    def row(self):
        try:
            yield
        except BlitextError as e:
            self.errors.append(str(e))

    def done(self) -> None:
        if len(self.errors) == 1:
            raise BlitextError(self.errors[0])
        if self.errors:
            for error in self.errors:
                say(f"[red]bad row[/] {error}")
            raise BlitextError(f"{self.path}: {len(self.errors)} rows cannot be used (each listed above; first: "
                               f"{self.errors[0]}); fix them and run again")


def _tar_part(ref: str) -> str | None:
    """'shard.tar#x.jpg' -> 'shard.tar'; None for a plain file reference."""
    head, sep, _member = ref.partition("#")
    return head if sep and head.endswith(".tar") else None


class _CaptionSink:
    """What every reader feeds, one row at a time: `add(image_id, image, captions, meta, where)`
    and `add_captions(image_id, captions, where)` (COCO's annotations). Blank captions are
    dropped here and counted, and so are caption rows without a caption (captions None: the key
    absent or null), for the callers to report: a row that adds no pair is not dropped unseen.
    An image listed without captions by design passes []. `_Grouper` keeps ImageRecords;
    read_pairs' sink keeps compact columns from the same rows."""

    def __init__(self):
        self.blank = 0
        self.no_caption = 0

    def _kept(self, captions: list[str] | None) -> list[str]:
        if captions is None:
            self.no_caption += 1
            return []
        kept = [c.strip() for c in captions if c.strip()]
        self.blank += len(captions) - len(kept)
        return kept


def _two_images(image_id: str, first: str, first_where: str, image: str, where: str) -> BlitextError:
    return BlitextError(f"id {image_id!r} names two different images: {first!r} ({first_where}) and "
                        f"{image!r} ({where}); give each image its own id")


def _not_in_images(image_id: str, where: str) -> BlitextError:
    return BlitextError(f"{where}: image_id {image_id!r} is not listed in \"images\"; "
                        f"add the image or remove the annotation")


class _Grouper(_CaptionSink):
    """Collects captions per image id in first-seen order; one id may name only one image."""

    def __init__(self):
        super().__init__()
        self._images: dict[str, tuple[str, list[str], dict, str]] = {}

    def add(self, image_id: str, image: str, captions: list[str] | None, meta: dict, where: str) -> None:
        entry = self._images.get(image_id)
        if entry is None:
            self._images[image_id] = (image, self._kept(captions), dict(meta), where)
            return
        if entry[0] != image:
            raise _two_images(image_id, entry[0], entry[3], image, where)
        entry[1].extend(self._kept(captions))

    def add_captions(self, image_id: str, captions: list[str] | None, where: str) -> None:
        if image_id not in self._images:
            raise _not_in_images(image_id, where)
        self._images[image_id][1].extend(self._kept(captions))

    def records(self) -> list[ImageRecord]:
        return [ImageRecord(id=i, image=img, captions=tuple(caps), meta=meta)
                for i, (img, caps, meta, _where) in self._images.items()]


def _captions(value: Any, where: str) -> list[str] | None:
    """A caption field may be one string or a list of strings (LAVIS eval files); blanks, and
    None for a row without one, are kept here for the _Grouper to drop and count."""
    if value is None:
        return None
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(c, str) for c in values):
        raise BlitextError(f"{where}: \"caption\" must be a string or a list of strings, got {_short(value)}")
    return values


def _id_from_path(ref: str) -> str:
    """An image without an explicit id is keyed by its path without the extension."""
    return str(PurePosixPath(ref).with_suffix(""))


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise BlitextError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                           f"fix or re-create the file") from None
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except OSError as e:
        raise BlitextError(f"{path}: cannot read ({e.strerror})") from None


def _not_utf8(path: Path) -> BlitextError:
    """Where the first non-UTF-8 byte is: a text-mode read reports offsets inside its buffer,
    not the file, so the bytes are decoded again here (only on this error path)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return BlitextError(f"{path} line {line} (byte offset {e.start}): byte 0x{data[e.start]:02x} is not UTF-8; "
                            f"re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
    return BlitextError(f"{path}: not UTF-8 text; re-save the file as UTF-8")
