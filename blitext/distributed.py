"""torch.distributed glue: one process per rank under torchrun, a plain process otherwise.

gloo on CPU (testable on a laptop), NCCL on GPUs. Every helper is a no-op when not
distributed, so phase code is written once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from blitext.allocator import keep_freed_memory
from blitext.errors import BlitextError, described

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: str) -> DistInfo:
    """Join the process group torchrun set up (env://); nothing to do for a single process."""
    info = dist_info()
    if info.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return info


def run_distributed(requested_device: str, job: Callable[[str, DistInfo], T]) -> T:
    """Pick the device, join torchrun's process group if there is one, run `job(device, info)`,
    and always leave the group: every phase tool's entry point. On the CPU, freed memory is kept
    for the next batch (use_device)."""
    device = use_device(requested_device)
    info = init_distributed(device)
    try:
        return job(device, info)
    finally:
        shutdown()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def in_turn(work: Callable[[], T] | None, what: str, group=None) -> T | None:
    """`work()` in the ranks given one (often rank 0 alone) while the others wait, then every rank
    hears whether it failed: the failing rank raises its own error, the others one line naming
    it ("rank 0 stopped while {what}: ..."), where a barrier would leave them to die of the lost
    connection with a gloo traceback, or to wait. A plain barrier where not distributed."""
    result, failure = None, None
    if work is not None:
        try:
            result = work()
        except Exception as e:  # handed on below, after the others hear of it
            failure = e
    if dist.is_initialized():
        group = group or _object_group()
        said: list[str | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(said, None if failure is None else described(failure), group=group)
    else:
        said = []
    if failure is not None:
        raise failure
    for rank, message in enumerate(said):
        if message is not None:
            raise BlitextError(f"rank {rank} stopped while {what}: {message}")
    return result


_OBJECT_GROUPS: dict[int, object] = {}


def _object_group():
    """The default group where it is gloo; under NCCL a gloo group over every rank, made once per
    process group (every rank reaches in_turn at the same points): NCCL's object collectives
    would need each rank's GPU set as the current device, which blitext does not do."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _OBJECT_GROUPS:
        _OBJECT_GROUPS.clear()
        _OBJECT_GROUPS[key] = dist.new_group(backend="gloo")
    return _OBJECT_GROUPS[key]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def use_device(requested: str = "auto") -> str:
    """pick_device, and where that is the CPU, keep freed memory for the next batch (allocator.py):
    every job that computes (phase tools, evaluation, blitext.load) starts here."""
    device = pick_device(requested)
    if device == "cpu":
        keep_freed_memory()
    return device


def pick_device(requested: str = "auto") -> str:
    """'auto': this rank's GPU when there is one, else the CPU (said aloud, never silently). A GPU asked
    for where there is none is one line here, before any model loads, rather than torch's traceback."""
    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise BlitextError(f"--device {requested}: this torch ({torch.__version__}) sees no CUDA GPU; "
                               "pass --device cpu (or auto), or install a CUDA build of torch")
        return requested
    if torch.cuda.is_available():
        return f"cuda:{dist_info().local_rank}"
    return "cpu"
