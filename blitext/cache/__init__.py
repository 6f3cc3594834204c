"""The sharded HDF5 cache that phase tools write and trainers read (see cache/README.md)."""
from blitext.cache.manifest import load_manifest, require_producer
from blitext.cache.reader import CacheDataset, FeatureCache, collate_rows
from blitext.cache.writer import CachePlan, ShardWriter, finalize, pending_shards, start_or_resume
from blitext.cache.convert import convert_store  # noqa: E402  (after the reader and writer it uses)

__all__ = [
    "CacheDataset", "CachePlan", "FeatureCache", "ShardWriter", "collate_rows", "convert_store", "finalize",
    "load_manifest", "pending_shards", "require_producer", "start_or_resume",
]
