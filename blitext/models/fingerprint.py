"""Model fingerprints: a name plus a hash of the weight files, recorded by every artifact.

Hashing gigabytes of weights on every load is slow, so digests are memoised per file
keyed by (real path, size, mtime): a changed file is hashed again.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from blitext.atomic import sha256_file
from blitext.config import default_cache_root

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")


def _memo_path() -> Path:
    return default_cache_root() / "models" / "fingerprints.json"


def _load_memo() -> dict:
    try:
        return json.loads(_memo_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_memo(memo: dict) -> None:
    path = _memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(memo, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # the memo is only a speed-up; a read-only cache root must not stop a run


def file_digest(path: Path, memo: dict | None = None) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if memo is not None and key in memo:
        return memo[key]
    digest = sha256_file(path)
    if memo is not None:
        memo[key] = digest
    return digest


def weight_files(path: Path) -> list[Path]:
    """The files that define a model: its weights and its config (not READMEs or tokenizers)."""
    if path.is_file():
        return [path]
    files = [p for p in sorted(path.rglob("*")) if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")]
    return files


def fingerprint(name: str, path: Path) -> str:
    """`name@<16 hex>`: equal only when the same weight files (names and bytes) are used."""
    memo = _load_memo()
    h = hashlib.sha256()
    base = path if path.is_dir() else path.parent
    for f in weight_files(path):
        h.update(str(f.relative_to(base)).encode())
        h.update(file_digest(f, memo).encode())
    _save_memo(memo)
    return f"{name}@{h.hexdigest()[:16]}"
