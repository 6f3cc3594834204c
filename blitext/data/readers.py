"""Read caption and VQA datasets in their standard on-disk formats; write blitext's own.

`read_image_set` detects the format from the path it is given:
  - a `.json` caption file: LAVIS / COCO-Karpathy (`[{"image", "caption", "image_id"?}]`) or
    official COCO captions (`{"images": [{"id", "file_name"}], "annotations": [...]}`);
  - a VATEX caption file (`[{"videoID", "enCap", "chCap"}]`: English captions, video `<videoID>.mp4`);
  - a folder holding `captions.jsonl` or `captions.csv`, or else just image (or else video) files;
  - webdataset `.tar` shards in img2dataset's layout: one `.tar`, a glob, or a folder of them.
`read_captions_into` reads the same formats row by row into any caption sink (parsing.py):
read_image_set's `_Grouper` keeps ImageRecords, read_pairs' keeps compact columns.
`write_lavis_json` writes blitext's own caption files. VQA files are in vqa.py.

Image references stay relative to a root folder and may not leave it: a dataset file is
data, and data must not make blitext read /etc/passwd or a sibling project's files (the checks,
shared with the VQA readers, are in parsing.py).
"""
from __future__ import annotations

import csv
import glob
import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from blitext.atomic import write_json
from blitext.data.parsing import (_BadRows, _captions, _CaptionSink, _Grouper, _id_from_path, _load_json,
                                  _not_utf8, _RefChecker, _short)
from blitext.data.records import ImageRecord, ImageSet
from blitext.data.video import VIDEO_EXTENSIONS, is_vatex, read_vatex
from blitext.data.webdataset import TAR_IMAGE_EXTENSIONS, tar_samples
from blitext.errors import BlitextError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
ACCEPTED_FORMATS = (
    "a LAVIS/COCO-Karpathy caption .json ([{\"image\", \"caption\"}]); "
    "an official COCO captions .json ({\"images\", \"annotations\"}); "
    "a VATEX caption .json ([{\"videoID\", \"enCap\"}]; video ids as <videoID>.mp4); "
    "a folder holding captions.jsonl or captions.csv; a folder of image files; "
    "webdataset .tar shards (one .tar, a glob such as shards/*.tar, or a folder of .tar files)"
)
_LAVIS_KEYS = {"image", "caption", "image_id"}
_JSONL_KEYS = {"image", "caption", "id"}


# ---------------------------------------------------------------- entry point

def read_image_set(path: str | Path, image_root: str | Path | None = None) -> ImageSet:
    """Read any supported caption dataset; `image_root` overrides the folder images are under."""
    groups = _Grouper()
    root, source = read_captions_into(path, image_root, groups)
    return ImageSet(root, groups.records(), source, blank_captions=groups.blank, no_caption_rows=groups.no_caption)


def read_captions_into(path: str | Path, image_root: str | Path | None, groups: _CaptionSink) -> tuple[Path, str]:
    """Feed a caption dataset's rows to `groups`; returns (the root images are under, what was read)."""
    path_text = str(path)
    path = Path(path)
    if not path.exists() and _is_glob(path_text):
        return _read_tar_glob(path_text, image_root, groups)
    if not path.exists():
        raise BlitextError(f"{path} does not exist; expected one of: {ACCEPTED_FORMATS}")
    if path.is_dir():
        return _read_folder(path, Path(image_root) if image_root else path, groups)
    root = Path(image_root) if image_root else path.parent
    read = {".json": _read_caption_json, ".jsonl": _read_jsonl, ".csv": _read_csv,
            ".tar": lambda p, r, g: _read_tar_shards([p], r, g)}.get(path.suffix.lower())
    if read is None:
        raise BlitextError(f"{path}: unsupported dataset format {path.suffix.lower() or '(no extension)'!r}; "
                           f"expected one of: {ACCEPTED_FORMATS}")
    read(path, root, groups)
    return root, str(path)


def _read_folder(folder: Path, root: Path, groups: _CaptionSink) -> tuple[Path, str]:
    for name, read in (("captions.jsonl", _read_jsonl), ("captions.csv", _read_csv)):
        if (folder / name).is_file():
            read(folder / name, root, groups)
            return root, str(folder / name)
    tars = sorted(folder.glob("*.tar"))
    if tars:
        _read_tar_shards(tars, root, groups)
        return root, str(folder)
    # a folder of images, else a folder of videos (captions then come from a separate file)
    if not (_read_image_folder(folder, root, groups) or _read_image_folder(folder, root, groups, VIDEO_EXTENSIONS)):
        raise BlitextError(f"{folder}: found no captions.jsonl, captions.csv, .tar shards, image files "
                           f"({', '.join(IMAGE_EXTENSIONS)}) or videos; expected one of: {ACCEPTED_FORMATS}")
    return root, str(folder)


# ---------------------------------------------------------------- shared helpers

def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


# ---------------------------------------------------------------- caption files

def _read_caption_json(path: Path, root: Path, groups: _CaptionSink) -> None:
    # Loaded whole: no incremental JSON parser among blitext's dependencies (jsonl streams).
    data = _load_json(path)
    if is_vatex(data):
        return _add_vatex(path, data, groups)
    if isinstance(data, list):
        return _read_lavis_list(path, data, root, groups)
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        return _read_coco(path, data, root, groups)
    keys = f" with keys {sorted(data)[:8]}" if isinstance(data, dict) else ""
    raise BlitextError(f"{path}: JSON is neither a LAVIS caption list ([{{\"image\", \"caption\"}}, ...]) nor "
                       f"official COCO captions ({{\"images\": [...], \"annotations\": [...]}}); "
                       f"got a {type(data).__name__}{keys}")


def _add_vatex(path: Path, data: list, groups: _CaptionSink) -> None:
    records, blank, no_caption = read_vatex(path, data)
    for record in records:  # captions already stripped and counted: _kept passes them as they are
        groups.add(record.id, record.image, list(record.captions), record.meta, str(path))
    groups.blank += blank
    groups.no_caption += no_caption


def _read_lavis_list(path: Path, data: list, root: Path, groups: _CaptionSink) -> None:
    check, bad = _RefChecker(root), _BadRows(path)
    for row, entry in enumerate(data):
        with bad.row():
            _add_lavis_entry(groups, check, entry, f"{path} entry {row}")
    bad.done()


def _add_lavis_entry(groups: _CaptionSink, check: _RefChecker, entry: Any, where: str) -> None:
    if not isinstance(entry, dict) or "image" not in entry:
        raise BlitextError(f"{where}: expected an object with an \"image\" key, got {_short(entry)}")
    image = check(entry["image"], where)
    image_id = str(entry["image_id"]) if entry.get("image_id") is not None else _id_from_path(image)
    meta = {k: v for k, v in entry.items() if k not in _LAVIS_KEYS}
    groups.add(image_id, image, _captions(entry.get("caption"), where), meta, where)


def _read_coco(path: Path, data: dict, root: Path, groups: _CaptionSink) -> None:
    check, bad = _RefChecker(root), _BadRows(path)
    for row, image in enumerate(data["images"]):
        with bad.row():
            where = f"{path} images[{row}]"
            if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
                raise BlitextError(f"{where}: expected {{\"id\", \"file_name\"}}, got {_short(image)}")
            groups.add(str(image["id"]), check(image["file_name"], where), [], {}, where)
    for row, ann in enumerate(data.get("annotations") or []):
        with bad.row():
            where = f"{path} annotations[{row}]"
            if not isinstance(ann, dict) or "image_id" not in ann:
                raise BlitextError(f"{where}: expected {{\"image_id\", \"caption\"}}, got {_short(ann)}")
            groups.add_captions(str(ann["image_id"]), _captions(ann.get("caption"), where), where)
    bad.done()


def _read_jsonl(path: Path, root: Path, groups: _CaptionSink) -> None:
    check, bad = _RefChecker(root), _BadRows(path)
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    with bad.row():
                        _add_row(groups, check, _parse_jsonl_line(line, f"{path} line {lineno}"), f"{path} line {lineno}")
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    bad.done()


def _parse_jsonl_line(line: str, where: str) -> dict:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise BlitextError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    if not isinstance(entry, dict):
        raise BlitextError(f"{where}: expected a JSON object with \"image\" and \"caption\", got {_short(entry)}")
    return entry


def _read_csv(path: Path, root: Path, groups: _CaptionSink) -> None:
    check, bad = _RefChecker(root), _BadRows(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if "image" not in header or "caption" not in header:
                raise BlitextError(f"{path} line 1: the header must name the columns image,caption "
                                   f"(and optionally id); found {header}")
            for row in reader:
                with bad.row():
                    where = f"{path} line {reader.line_num}"
                    if None in row or any(v is None for v in row.values()):
                        raise BlitextError(f"{where}: has a different number of fields than the header {header}; "
                                           f"quote captions that contain commas")
                    _add_row(groups, check, row, where)
    except csv.Error as e:
        raise BlitextError(f"{path}: malformed CSV ({e}); fix the file") from None
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    bad.done()


def _add_row(groups: _CaptionSink, check: _RefChecker, row: dict, where: str) -> None:
    """One jsonl line or csv row: {"image", "caption", "id"?} plus any extra fields as meta."""
    if "image" not in row:
        raise BlitextError(f"{where}: missing \"image\"; each row needs image and caption")
    image = check(row["image"], where)
    has_id = row.get("id") not in (None, "")
    image_id = str(row["id"]) if has_id else _id_from_path(image)
    meta = {k: v for k, v in row.items() if k not in _JSONL_KEYS}
    groups.add(image_id, image, _captions(row.get("caption"), where), meta, where)


def _read_image_folder(folder: Path, root: Path, groups: _CaptionSink,
                       extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> int:
    """Adds the folder's files with the given extensions to `groups`; returns how many."""
    check, found = _RefChecker(root), []
    for path in sorted(folder.rglob("*"), key=lambda p: p.as_posix()):
        relative = path.relative_to(folder)
        # Hidden folders are editor/VCS clutter (.ipynb_checkpoints), not dataset images.
        if path.suffix.lower() not in extensions or any(p.startswith(".") for p in relative.parts):
            continue
        if path.is_file():
            found.append((check(os.path.relpath(path, root), str(path)), str(path)))
    for image_id, (image, where) in zip(_folder_ids([image for image, _ in found]), found):
        groups.add(image_id, image, [], {}, where)
    return len(found)


def _folder_ids(images: list[str]) -> list[str]:
    """Ids for a plain folder: the path without its extension, except where that would give two
    files one id (x.jpg, x.png): those keep their extension. A folder has no other way to name
    them, and the files that do not collide keep the ids (and cache rows) they always had.
    Repeated because a kept extension can meet another file's stem ("x.jpg" of x.jpg.png);
    it ends, as full paths are unique."""
    full: set[str] = set()
    while True:
        ids = [image if image in full else _id_from_path(image) for image in images]
        seen = Counter(ids)
        clash = {image for image, i in zip(images, ids) if seen[i] > 1} - full
        if not clash:
            return ids
        full |= clash


# ---------------------------------------------------------------- webdataset shards

def _read_tar_glob(pattern: str, image_root: str | Path | None, groups: _CaptionSink) -> tuple[Path, str]:
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    if not matches:
        raise BlitextError(f"{pattern}: the glob matches no files; check the path (expected .tar shards)")
    not_tar = [str(p) for p in matches if p.suffix.lower() != ".tar"]
    if not_tar:
        raise BlitextError(f"{pattern}: a glob must match only .tar shards, but it also matches {not_tar[:3]}; "
                           f"narrow it, e.g. shards/*.tar")
    root = Path(image_root) if image_root else _glob_base(pattern)
    _read_tar_shards(matches, root, groups)
    return root, pattern


def _glob_base(pattern: str) -> Path:
    """The folder above the first wildcard: 'data/shards/*.tar' -> 'data/shards'."""
    parts = []
    for part in Path(pattern).parts[:-1]:
        if _is_glob(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _read_tar_shards(tars: list[Path], root: Path, groups: _CaptionSink) -> None:
    check, samples = _RefChecker(root), 0
    for tar_path in tars:
        tar_ref = check(os.path.relpath(tar_path, root), str(tar_path))
        for key, member, caption, json_key in tar_samples(tar_path):
            where = f"{tar_path}#{member}"
            captions = [caption] if caption is not None else None  # a sample without .txt: no caption
            groups.add(json_key or key, f"{tar_ref}#{member}", captions, {}, where)
            samples += 1
    if not samples:
        raise BlitextError(f"{', '.join(map(str, tars[:3]))}: no samples with an image member "
                           f"({', '.join(TAR_IMAGE_EXTENSIONS)}); expected img2dataset-style shards")


# ---------------------------------------------------------------- writer

def write_lavis_json(path: str | Path, records: Iterable[ImageRecord]) -> None:
    """One entry per image with its captions as a list (LAVIS's eval layout); meta as extra keys."""
    entries = [{**r.meta, "image": r.image, "caption": list(r.captions), "image_id": r.id} for r in records]
    write_json(Path(path), entries)
