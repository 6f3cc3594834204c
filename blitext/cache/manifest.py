"""The cache manifest: what made the features, their dtype and shapes, and where each key lives.

A cache directory holds `shard-NNNNN.h5` files, one `shard-NNNNN.json` sidecar per finished
shard, `run.json` (written when the run starts, so a resume can check it is the same job)
and `manifest.json` (written last: a cache without it is unfinished). The manifest holds a
summary per shard; the keys are in each shard, its sidecar and the key index (`index/`, see
keyindex.py), so reading the manifest costs the same at any number of rows.

Format 1 manifests also listed every key of every shard; they still open (see keyindex.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blitext.errors import BlitextError

FORMAT = "blitext-cache/4"
KEYS_IN_MANIFEST = "blitext-cache/1"  # before the key index: every key listed in manifest.json
SORTED_HASHES = "blitext-cache/2"     # the key index as sorted hashes (hashes.npy, rows.npy), before slots.npy
KEY_SPANS = "blitext-cache/3"         # slots.npy with 64-bit hashes and each key's place in keys.bin, compared
# Each is upgraded in place on first open (keyindex.upgrade); blitext before format 4 refuses a
# format-4 cache in one line instead of reading its slots as format 3's.
OLDER_FORMATS = (KEYS_IN_MANIFEST, SORTED_HASHES, KEY_SPANS)
MANIFEST = "manifest.json"
RUN = "run.json"

FEATURE_KINDS = ("image-features", "video-features")
PROMPT_KINDS = ("prompts",)
KIND_NAMES = {  # for the line naming a cache given where another kind is wanted
    "image-features": "an image-feature cache (made by extract-features)",
    "video-features": "a video-feature cache (made by extract-features --modality video or import-features)",
    "prompts": "a prompt cache (made by build-prompts)",
}
WANTED = {
    FEATURE_KINDS: "--features wants a feature cache (made by extract-features, or import-features for videos)",
    PROMPT_KINDS: "--prompts wants a prompt cache (made by build-prompts)",
}


def require_kind(root: Path, kind: str, kinds: tuple[str, ...]) -> None:
    if kind not in kinds:
        named = KIND_NAMES.get(kind, f"a {kind!r} cache")
        wanted = WANTED.get(kinds, f"a {' or '.join(kinds)} cache is wanted here")
        raise BlitextError(f"{root} is {named}; {wanted}")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def sidecar_name(index: int) -> str:
    return f"shard-{index:05d}.json"


def normalised(obj: Any) -> Any:
    """JSON round trip, so tuples and lists (and int/float keys) compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True))


def describe(producer: dict) -> str:
    parts = []
    for key, value in sorted(producer.items()):
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
            parts.append(f"{key} ({value})")
        else:
            parts.append(f"{key}={value}")
    return "; ".join(parts)


def producer_mismatch(found: dict, expected: dict) -> dict[str, tuple[Any, Any]]:
    """Fields of `expected` whose value in `found` differs: {field: (found, expected)}.

    The encoder's name is where its folder was given ("./enc", "/abs/enc"; caches made before
    the resolved path was recorded hold what the user typed): with equal fingerprints (folder
    name + weight bytes) it is the same encoder, so that difference alone is not a mismatch."""
    found, expected = normalised(found), normalised(expected)
    diff = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
    if "encoder" in diff and "fingerprint" not in diff and expected.get("fingerprint"):
        del diff["encoder"]
    return diff


def same_identity(recorded: Any, wanted: Any) -> bool:
    """For a checkpoint's recorded identity: equal, or two producers that differ only where the
    encoder folder was named (see producer_mismatch), checked both ways."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        return not producer_mismatch(recorded, wanted) and not producer_mismatch(wanted, recorded)
    return recorded == wanted


def require_producer(found: dict, expected: dict, where: Path, fix: str) -> None:
    """Refuse a cache made by another model or preprocessing, naming both and the fix."""
    diff = producer_mismatch(found, expected)
    if not diff:
        return
    made = "; ".join(f"{k}={_short(a)}" for k, (a, _) in diff.items())
    wants = "; ".join(f"{k}={_short(b)}" for k, (_, b) in diff.items())
    raise BlitextError(f"{where} was made with {made}; this run expects {wants}: {fix}")


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)


def load_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        hint = " (unfinished: run the command that made it again to resume)" if (Path(root) / RUN).is_file() else ""
        raise BlitextError(f"{root} is not a finished blitext cache: no {MANIFEST}{hint}")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise BlitextError(f"{path} is not valid JSON ({e}); re-run the command that made the cache") from None
    if manifest.get("format") not in (FORMAT, *OLDER_FORMATS):
        raise BlitextError(f"{path} has format {manifest.get('format')!r}; this blitext reads {FORMAT!r}")
    return manifest


def shard_keys(root: Path, index: int, entry: dict) -> list[str]:
    """A shard's keys: from its sidecar (format 1 manifests hold them themselves)."""
    if "keys" in entry:
        return entry["keys"]
    return json.loads((Path(root) / sidecar_name(index)).read_text())["keys"]
