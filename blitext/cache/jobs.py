"""A sharded cache job across ranks: rank 0 starts or checks it, each rank writes its own
shards, rank 0 gathers the manifest. Used by every phase tool that writes a cache."""
from __future__ import annotations

from typing import Callable, TypeVar

from blitext.cache.writer import CachePlan, finalize, pending_shards, start_or_resume
from blitext.distributed import DistInfo, barrier, in_turn

T = TypeVar("T")


def run_sharded_job(plan: CachePlan, info: DistInfo, write_shards: Callable[[list[int], int], T]) -> T:
    """Calls `write_shards(pending shard indices of this rank, number already finished)`."""
    in_turn((lambda: start_or_resume(plan)) if info.is_main else None, f"starting the cache {plan.root}")
    if not info.is_main:
        start_or_resume(plan, write=False)
    shards = pending_shards(plan, info.rank, info.world)
    finished = len(range(info.rank, plan.num_shards, info.world)) - len(shards)
    result = write_shards(shards, finished)
    barrier()
    in_turn((lambda: finalize(plan)) if info.is_main else None, f"finishing the cache {plan.root}")
    return result
