"""A copy of a finished cache with its rows in another store: an fp16 cache as an int8 one (or
back), without running the encoder again. Same keys, shards, failures, producer and dtype;
the provenance names the cache it was converted from."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from blitext.atomic import read_json
from blitext.cache.manifest import sidecar_name
from blitext.cache.quantise import STORES, store_name, stored_dtype
from blitext.cache.reader import FeatureCache
from blitext.cache.writer import CachePlan, ShardWriter, finalize, pending_shards, start_or_resume
from blitext.errors import BlitextError

ROWS_AT_ONCE = 256


def convert_store(src: str | Path, out: str | Path, store: str | None = "int8") -> dict:
    """Write `src`'s rows to a new cache `out` stored as `store` ("int8", or "fp16"/None: as the
    dtype); returns its manifest. Resumable as extraction is: run it again after a kill."""
    if not Path(src).exists():
        raise BlitextError(f"{src} does not exist: give the folder of a finished cache")
    cache = FeatureCache(src, kinds=None)
    m = cache.manifest
    if store not in (*STORES, None):
        raise BlitextError(f"--store {store!r}: expected {' or '.join(STORES)}")
    wanted = STORES.get(store)
    require_a_change(Path(src), m, wanted)
    if m["variable_length"]:
        raise BlitextError(f"{src} holds variable-length rows: only fixed rows can be stored as int8")
    sidecars = [read_json(Path(src) / sidecar_name(i)) for i in range(len(m["shards"]))]
    # each shard's rows, then its failures: the shard keeps its range of the plan, as extracted
    keys = [k for s in sidecars for k in s["keys"] + [f["key"] for f in s["failed"]]]
    provenance = {**m.get("provenance", {}), "converted_from": str(src)}
    plan = CachePlan(Path(out), m["kind"], m["producer"], keys, m["shard_size"], m["dtype"], store=wanted,
                     provenance=provenance)
    start_or_resume(plan)
    for i in pending_shards(plan):
        with ShardWriter(plan, i) as writer:
            rows = sidecars[i]["keys"]
            for at in range(0, len(rows), ROWS_AT_ONCE):
                batch = rows[at:at + ROWS_AT_ONCE]
                writer.add(batch, np.stack(cache.get_many(batch)))
            for f in sidecars[i]["failed"]:
                writer.fail(f["key"], f["input"], f["reason"])
    return finalize(plan)


def require_a_change(src: Path, manifest: dict, wanted: str | None) -> None:
    """Refuse a conversion that would copy the rows into the store they are already in."""
    dtype = manifest["dtype"]
    now = stored_dtype(manifest)
    if (wanted or dtype) == now:
        instead = f"--store fp16 writes it back as {dtype}" if now != dtype else "--store int8 halves its bytes"
        raise BlitextError(f"{src} is already stored as {store_name(now)}: nothing to convert ({instead})")
