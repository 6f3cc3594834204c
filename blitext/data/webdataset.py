"""webdataset `.tar` shards in img2dataset's layout: members grouped into samples by key, each
sample's image member, caption (`.txt`, else the `.json`'s "caption") and `.json` "key"."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

from blitext.errors import BlitextError

TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def tar_samples(tar_path: Path) -> list[tuple[str, str, str | None, str | None]]:
    """(key, image member, caption, json "key") per sample; members grouped by basename."""
    try:
        with tarfile.open(tar_path) as tar:
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in tar:
                if member.isfile():
                    key, ext = _split_member(member.name)
                    samples.setdefault(key, {})[ext] = member
            return [s for key, parts in samples.items() if (s := _tar_sample(tar, tar_path, key, parts))]
    except (tarfile.TarError, OSError) as e:
        raise BlitextError(f"{tar_path}: not a readable tar file ({e}); re-create the shard") from None


def _split_member(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_sample(tar: tarfile.TarFile, tar_path: Path, key: str, parts: dict) -> tuple | None:
    image = next((parts[e] for e in TAR_IMAGE_EXTENSIONS if e in parts), None)
    if image is None:
        return None
    meta = {}
    if "json" in parts:
        meta = _tar_json(tar, parts["json"], f"{tar_path}#{parts['json'].name}")
    caption = meta.get("caption") if isinstance(meta.get("caption"), str) else None
    if "txt" in parts:
        where = f"{tar_path}#{parts['txt'].name}"
        try:
            caption = tar.extractfile(parts["txt"]).read().decode("utf-8")
        except UnicodeDecodeError:
            raise BlitextError(f"{where}: caption is not UTF-8 text; re-create the shard") from None
    json_key = meta.get("key")
    return key, image.name, caption, (str(json_key) if json_key not in (None, "") else None)


def _tar_json(tar: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> dict:
    try:
        data = json.loads(tar.extractfile(member).read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BlitextError(f"{where}: not valid JSON ({e}); re-create the shard") from None
    return data if isinstance(data, dict) else {}
