"""Shared by the bench scripts: machine description, writing results to bench/results/, and a
process's unique and private dirty memory (bench/scale.py and bench/scale_inputs.py)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path


RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    import torch  # here: a bench that measures a torch-free process (scale.py) imports this module too

    return {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def git_commit() -> str:
    """This checkout's commit, "+dirty" when tracked files differ from it: call it when a bench
    starts, so a commit made while it runs is not recorded as the one measured."""
    root = Path(__file__).parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    return head + ("+dirty" if dirty else "")


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"written to {path}")
    return path


def uss_mb(process) -> float:
    """Memory only this process holds (MB): its own pages, and mapped file pages no other process maps."""
    return process.memory_full_info().uss / 2**20


def private_dirty_mb(pid: int) -> float:
    """Memory the process wrote itself (MB): its heap, and pages copied from its parent on write."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) / 1024
    return float("nan")
