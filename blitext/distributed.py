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
from blitext.errors import BlitextError

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
