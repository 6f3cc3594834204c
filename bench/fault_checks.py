"""What bench/faults.py checks after each fault (the resumed job against an uninterrupted
run: cache bytes, weights, rows and steps lost; a refusal in one line) and the damage it does
to a finished cache (flipped row bits, broken HDF5 metadata, a truncated shard)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path


# ---------------------------------------------------------------- comparing with the uninterrupted run

def is_cache(phase: str) -> bool:
    return phase in ("extract-features", "build-prompts")


def rows_lost(ref: Path, got: Path) -> int:
    """Rows of the reference cache missing from `got` or not equal byte for byte."""
    from blitext.cache import FeatureCache
    from blitext.errors import BlitextError

    a = FeatureCache(ref, kinds=None)
    try:
        b = FeatureCache(got, kinds=None)
    except BlitextError:  # not finished: every row is missing
        return len(a)
    return sum(1 for k in a.keys if k not in b or a[k].tobytes() != b[k].tobytes())


def same_cache(ref: Path, got: Path) -> bool:
    names = sorted(p.name for p in ref.glob("shard-*.h5"))
    return names == sorted(p.name for p in got.glob("shard-*.h5")) and \
        all((ref / n).read_bytes() == (got / n).read_bytes() for n in names)


def steps_lost(ref: Path, got: Path) -> int:
    """Steps of the reference run missing from `got`'s metrics or logged with another loss."""
    def losses(run: Path) -> dict:
        path = run / "metrics.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
        return {m["step"]: m.get("loss") for m in lines if "loss" in m}
    a, b = losses(ref), losses(got)
    return sum(1 for step, loss in a.items() if b.get(step) != loss)


def same_weights(ref: Path, got: Path) -> bool:
    from safetensors.torch import load_file

    path = got / "final" / "model.safetensors"
    if not path.exists():
        return False
    a, b = load_file(ref / "final" / "model.safetensors"), load_file(path)
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def identical(phase: str, ref: Path, got: Path) -> tuple[bool, int]:
    """(identical to the reference, rows or steps lost)."""
    if is_cache(phase):
        return same_cache(ref, got), rows_lost(ref, got)
    return same_weights(ref, got), steps_lost(ref, got)


def one_line_refusal(proc: subprocess.CompletedProcess) -> tuple[bool, str]:
    out = proc.stdout + proc.stderr
    lines = [x for x in out.splitlines() if "error:" in x]
    ok = proc.returncode == 2 and "Traceback" not in out and len(lines) == 1
    return ok, lines[0].strip() if lines else out.strip()[-300:]



# ---------------------------------------------------------------- damage done to a cache

def flip_rows(cache: Path) -> tuple[str, int]:
    """One bit flipped in every row of shard 1 (row data, not metadata)."""
    import h5py

    shard = cache / "shard-00001.h5"
    with h5py.File(shard, "r") as f:
        starts = []
        f["data"].id.chunk_iter(lambda info: starts.append(info.byte_offset))
    raw = bytearray(shard.read_bytes())
    for s in starts:
        raw[s + 101] ^= 0x04
    shard.write_bytes(bytes(raw))
    return shard.name, len(starts)


def break_metadata(cache: Path) -> tuple[str, int]:
    shard = cache / "shard-00002.h5"
    raw = bytearray(shard.read_bytes())
    tree = raw.index(b"TREE\x01")  # the chunk index
    raw[tree:tree + 16] = b"\xee" * 16
    shard.write_bytes(bytes(raw))
    return shard.name, 4


def truncate(cache: Path) -> tuple[str, int]:
    shard = cache / "shard-00003.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard.name, 4


def _chunk_key(shard: Path, row: int) -> int:
    """Where row `row`'s key sits in the shard's chunk index (a v1 B-tree: chunk size, filter
    mask, the chunk's coordinates, 8 bytes each; the chunk's address follows the key)."""
    import struct

    import h5py

    with h5py.File(shard, "r") as f:
        size, ndim = f["data"].id.get_chunk_info(0).size, f["data"].ndim
    key = struct.pack("<II", size, 0) + struct.pack(f"<{ndim + 1}Q", row, *[0] * ndim)
    return shard.read_bytes().index(key)


def move_chunk(cache: Path) -> tuple[str, int]:
    """One bit flipped in the chunk index: row 1's chunk claims row 3 (HDF5 then reads row 1 as zeros)."""
    shard = cache / "shard-00001.h5"
    raw = bytearray(shard.read_bytes())
    raw[_chunk_key(shard, 1) + 8] ^= 0x02  # coordinate 1 -> 3
    shard.write_bytes(bytes(raw))
    return shard.name, 1


def flip_chunk_address(cache: Path) -> tuple[str, int]:
    """The top bit of row 2's chunk address (an address past 2**63: OverflowError before)."""
    import h5py

    shard = cache / "shard-00002.h5"
    with h5py.File(shard, "r") as f:
        ndim = f["data"].ndim
    address = _chunk_key(shard, 2) + 8 + 8 * (ndim + 1)
    raw = bytearray(shard.read_bytes())
    raw[address + 7] ^= 0x80
    shard.write_bytes(bytes(raw))
    return shard.name, 1


def flip_weights(folder: Path, count: int = 16) -> None:
    """16 bytes of tensor data near the end of model.safetensors: the header still parses."""
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    for i in range(count):
        raw[-64 - 4 * i] ^= 0x01
    path.write_bytes(bytes(raw))


def whole_jsonl(path: Path) -> bool:
    """Every line of a metrics log parses (no torn line left by a failed append)."""
    try:
        return all(json.loads(x) is not None for x in path.read_text().splitlines() if x.strip())
    except ValueError:
        return False


def exif_photos(folder: Path) -> Path:
    """The same random photo stored upright and stored sideways with EXIF orientation 6, + captions.jsonl."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90).save(folder / "phone.png", exif=exif)
    lines = [{"image": f"{n}.png", "caption": "a photo", "id": n} for n in ("upright", "phone")]
    (folder / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder
