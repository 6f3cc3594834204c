"""Turn the real data that ships inside packages into blitext datasets on disk.

    easy-vqa       PyPI easy-vqa (easy_vqa.py): 5,000 64x64 shapes, captions from their answers, real VQA
    tuxpaint       Debian tuxpaint-stamps-default: 785 stamps with human-written English captions
    fashion-mnist  Debian dataset-fashion-mnist: 70,000 28x28 product photos, templated captions
    moving-shapes  generated (moving_shapes.py): 360 short .mp4 clips of a shape moving, captioned

Each is written to `<out_root>/<name>/` as images plus LAVIS caption JSON (and VQAv2 JSON where
there are questions), so the ordinary readers open them. A build happens in a temp folder
beside the target and is renamed into place; `prepared.json` records what was built, and a
second call with the same settings returns at once.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from blitext import __version__
from blitext.config import default_cache_root
from blitext.atomic import write_json
from blitext.data.easy_vqa import build_easy_vqa, find_easy_vqa
from blitext.data.moving_shapes import build_moving_shapes
from blitext.data.readers import write_lavis_json
from blitext.data.vqa import write_vqa_json
from blitext.data.records import ImageRecord, VQARecord
from blitext.errors import BlitextError

MARKER = "prepared.json"
TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class _Dataset:
    find_source: Callable[[Path | None, bool], Path]  # (given source or None, install allowed) -> folder to read
    build: Callable[[Path, Path, int | None], dict]  # (source, out folder, limit) -> counts
    about: str


def list_datasets() -> list[str]:
    return list(_DATASETS)


def prepare_dataset(name: str, out_root: Path | None = None, limit: int | None = None,
                    source: Path | None = None, install: bool = False, withhold: tuple[str, ...] = (),
                    test_limit: int | None = None) -> Path:
    """Build dataset `name` under `out_root/name` (once) and return that folder.

    install=True lets a Debian data set's missing package be installed with apt-get (as root);
    without it a missing package is an error naming the command to run. easy-vqa only:
    `withhold` keeps colour x shape combinations ("red circle", or "default") out of the train
    images, `test_limit` sets the test images apart from `limit` (the train images)."""
    dataset = _DATASETS.get(name)
    if dataset is None:
        raise BlitextError(f"unknown dataset {name!r}; blitext can prepare: {', '.join(_DATASETS)}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise BlitextError(f"limit must be a positive number of images, got {limit!r}")
    out_root = Path(out_root) if out_root is not None else default_cache_root() / "data"
    final = out_root / name
    options = {k: v for k, v in (("withhold", tuple(withhold)), ("test_limit", test_limit)) if v}
    if options and name != "easy-vqa":
        raise BlitextError(f"{' and '.join(options)} apply to easy-vqa only, not {name}")
    if test_limit is not None and (not isinstance(test_limit, int) or test_limit < 1):
        raise BlitextError(f"test_limit must be a positive number of images, got {test_limit!r}")
    wanted = {"name": name, "limit": limit, "source": str(source) if source is not None else None,
              "blitext_version": __version__, **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}}
    if _marker_matches(final, wanted):
        return final
    src = dataset.find_source(Path(source) if source is not None else None, install)
    tmp = out_root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        counts = dataset.build(src, tmp, limit, **options)
        write_json(tmp / MARKER, {**wanted, "read_from": str(src), "counts": counts})
        _move_into_place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _marker_matches(folder: Path, wanted: dict) -> bool:
    try:
        recorded = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and all(recorded.get(k) == v for k, v in wanted.items())


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished build over the old one; readers never see a half-built folder."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


# ---------------------------------------------------------------- Debian packages

def _ensure_debian_package(package: str, path: Path, what: str, install: bool) -> Path:
    """Return `path`; when it is missing, install `package` only if asked to (install=True,
    `data prepare --install`): changing the system is the user's decision, not a side effect."""
    if path.is_dir():
        return path
    command = f"apt-get install --no-install-recommends {package}"
    sudo = "" if hasattr(os, "geteuid") and os.geteuid() == 0 else "sudo "
    if not install:
        raise BlitextError(f"{path} not found: {what} come from the Debian package {package}: "
                           f"run `{sudo}{command}`, or pass --install to have blitext run it (as root)")
    if not _can_install_packages():
        raise BlitextError(f"{path} not found and --install needs root and apt-get: run `sudo {command}` yourself")
    _install_debian_package(package)
    if not path.is_dir():
        raise BlitextError(f"{path} still not found after `{command}`; run it by hand and read its errors")
    return path


def _install_debian_package(package: str) -> None:
    """apt-get install, refreshing the package lists once if that fails (fresh containers have none)."""
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    if not _run_apt(install):
        _run_apt(["apt-get", "update"])
        _run_apt(install)


def unpack_debian_package(package: str, dest: Path) -> Path:
    """`apt-get download` + `dpkg -x` into `dest` (no root needed, nothing installed); returns `dest`.

    For files that only ship inside a Debian package (python3-imageio's sample videos).
    """
    dest = Path(dest)
    if dest.is_dir() and any(dest.iterdir()):
        return dest
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise BlitextError(f"cannot unpack {package}: apt-get and dpkg are needed (a Debian/Ubuntu system)")
    download = dest.with_name(f".{dest.name}.deb-{os.getpid()}")
    download.mkdir(parents=True, exist_ok=True)
    try:
        fetched = subprocess.run(["apt-get", "download", package], cwd=download, capture_output=True, text=True)
        debs = sorted(download.glob(f"{package}_*.deb"))
        if not debs:
            why = (fetched.stderr or fetched.stdout).strip().splitlines()[-1:] or ["no .deb written"]
            raise BlitextError(f"`apt-get download {package}` failed ({why[0]}); run `apt-get update` or fetch "
                               f"the .deb by hand and `dpkg -x` it into {dest}")
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        unpacked = subprocess.run(["dpkg", "-x", str(debs[0]), str(tmp)], capture_output=True, text=True)
        if unpacked.returncode != 0:
            raise BlitextError(f"`dpkg -x {debs[0].name}` failed: {unpacked.stderr.strip()[:200]}")
        _move_into_place(tmp, dest)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return dest


def _can_install_packages() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def _run_apt(command: list[str]) -> bool:
    """Run an apt command, echoing its output to stderr so the user sees what it does."""
    print(f"blitext: running {' '.join(command)}", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
            for line in proc.stdout:
                print(line, end="", file=sys.stderr, flush=True)
        return proc.returncode == 0
    except OSError as e:
        print(f"blitext: {command[0]} failed to start: {e}", file=sys.stderr)
        return False


# ---------------------------------------------------------------- Tux Paint stamps

def _find_tuxpaint(source: Path | None, install: bool = False) -> Path:
    if source is None:
        return _ensure_debian_package("tuxpaint-stamps-default", TUXPAINT_STAMPS, "Tux Paint stamps", install)
    # Accept the stamps folder itself, or a `dpkg -x` tree holding usr/share/tuxpaint/stamps.
    for stamps in (source / "usr" / "share" / "tuxpaint" / "stamps", source / "stamps", source):
        if stamps.is_dir():
            return stamps
    raise BlitextError(f"{source} is not a folder; pass Tux Paint's stamps folder (e.g. {TUXPAINT_STAMPS})")


def _build_tuxpaint(stamps: Path, out: Path, limit: int | None) -> dict:
    records = []
    for png in sorted(stamps.rglob("*.png"), key=lambda p: p.as_posix()):
        caption = _tuxpaint_caption(png.with_suffix(".txt"))
        if caption is None:  # *_mirror.png and the like: a flipped copy with no description of its own
            continue
        relative = png.relative_to(stamps).as_posix()
        ref = f"images/{relative}"
        (out / ref).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, out / ref)
        category = relative.split("/")[0] if "/" in relative else ""
        records.append(ImageRecord(relative.removesuffix(".png"), ref, (caption,), {"category": category}))
        if limit and len(records) >= limit:
            break
    if not records:
        raise BlitextError(f"{stamps}: no .png stamps with a .txt description; pass the stamps folder of "
                           f"tuxpaint-stamps-default ({TUXPAINT_STAMPS})")
    write_lavis_json(out / "captions.json", records)
    return {"images": len(records)}


def _tuxpaint_caption(txt: Path) -> str | None:
    """The first line of a stamp's .txt is its English description; later lines are
    translations written `lang.utf8=...`. None when there is no English line."""
    if not txt.is_file():
        return None
    try:
        first = txt.read_text(encoding="utf-8").split("\n", 1)[0].strip()
    except UnicodeDecodeError:
        raise BlitextError(f"{txt}: not UTF-8 text; reinstall tuxpaint-stamps-default") from None
    if not first or re.match(r"^[A-Za-z_@]+\.utf8=", first):
        return None
    return first


# ---------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_FILES = {  # split -> (images, labels), the names in the Debian package
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Labels 0-9. The official name of 0 is "T-shirt/top"; a caption and a VQA answer want one word.
FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")


def _find_fashion_mnist(source: Path | None, install: bool = False) -> Path:
    if source is None:
        return _ensure_debian_package("dataset-fashion-mnist", FASHION_MNIST_DIR, "Fashion-MNIST's files", install)
    for folder in (source / "usr" / "share" / "datasets" / "fashion-mnist", source):
        if (folder / FASHION_MNIST_FILES["train"][0]).is_file():
            return folder
    raise BlitextError(f"{source}: no {FASHION_MNIST_FILES['train'][0]} found; pass the folder holding "
                       f"Fashion-MNIST's IDX .gz files (e.g. {FASHION_MNIST_DIR})")


def _build_fashion_mnist(folder: Path, out: Path, limit: int | None) -> dict:
    counts = {}
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        images, labels = _read_idx(folder / images_name), _read_idx(folder / labels_name)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or labels.max(initial=0) > 9:
            raise BlitextError(f"{folder}: {images_name} {images.shape} and {labels_name} {labels.shape} "
                               f"do not form a Fashion-MNIST split; reinstall dataset-fashion-mnist")
        counts[split] = _write_fashion_mnist_split(images, labels, split, out, limit)
    return counts


def _write_fashion_mnist_split(images: np.ndarray, labels: np.ndarray, split: str, out: Path,
                               limit: int | None) -> dict:
    (out / "images" / split).mkdir(parents=True)
    records, vqa = [], []
    for i in range(min(limit or len(images), len(images))):
        ref, name = f"images/{split}/{i}.png", FASHION_MNIST_CLASSES[labels[i]]
        Image.fromarray(images[i]).save(out / ref, compress_level=1)  # 28x28: speed over size
        article = "an" if name[0] in "aeiou" else "a"
        records.append(ImageRecord(f"{split}-{i}", ref, (f"a photo of {article} {name}",),
                                   {"label": int(labels[i]), "class": name}))
        vqa.append(VQARecord(f"{split}-{i}", f"{split}-{i}", ref, "what is in the picture?", (name,) * 10, "other"))
    write_lavis_json(out / f"captions_{split}.json", records)
    write_vqa_json(out / f"vqa_{split}_questions.json", out / f"vqa_{split}_annotations.json", vqa)
    return {"images": len(records), "questions": len(vqa)}


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (big-endian: 0, 0, type 0x08 = uint8, ndim; then ndim uint32 sizes; data)."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise BlitextError(f"{path}: cannot read gzip data ({e}); reinstall dataset-fashion-mnist") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise BlitextError(f"{path}: not an IDX file of unsigned bytes (starts {data[:4].hex()}); "
                           f"reinstall dataset-fashion-mnist")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise BlitextError(f"{path}: IDX header cut short; reinstall dataset-fashion-mnist")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise BlitextError(f"{path}: header says shape {dims} but holds {len(body)} bytes of data; "
                           f"the file is truncated: reinstall dataset-fashion-mnist")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


_DATASETS = {
    "easy-vqa": _Dataset(lambda source, _install: find_easy_vqa(source), build_easy_vqa,
                         "easy-VQA shapes with composed captions and real VQA"),
    "tuxpaint": _Dataset(_find_tuxpaint, _build_tuxpaint, "Tux Paint stamps with human English captions"),
    "fashion-mnist": _Dataset(_find_fashion_mnist, _build_fashion_mnist, "Fashion-MNIST with templated captions"),
    # generated, so there is no source to find; the marker records what made it
    "moving-shapes": _Dataset(lambda _source, _install: Path("generated by blitext.data.moving_shapes"),
                              build_moving_shapes, "generated .mp4 clips of a shape moving, with captions"),
}
