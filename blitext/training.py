"""Pieces every trainer shares: the learning-rate schedule, step seeds, the metrics log.

Randomness is a function of (seed, step, rank): each step reseeds torch from them, so a
resumed run replays exactly the masks and dropout an uninterrupted run would have used,
with no RNG state to save.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed

from blitext.atomic import publish, writing
from blitext.checkpoint import RESUME_LATEST
from blitext.config import to_jsonable
from blitext.console import rank_logger, say
from blitext.distributed import in_turn
from blitext.errors import BlitextError
from blitext.trackers import Trackers


def lr_at(step: int, total: int, lr: float, min_lr: float, warmup_steps: int, warmup_start_lr: float) -> float:
    """Linear warm-up from warmup_start_lr to lr, then cosine decay to min_lr (the paper's schedule)."""
    if step < warmup_steps:
        return warmup_start_lr + (lr - warmup_start_lr) * step / warmup_steps
    span = max(1, total - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel: the default per-tensor loop took 1.5 s a step for a 24M
    P-Former on 2 CPU cores, the fused one 0.5 s (measured here). `params` is tensors or
    param groups; a group's "lr_scale" multiplies the schedule's rate (see set_lr)."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay, fused=True)


def llm_proj_groups(model: torch.nn.Module, llm_proj_lr_scale: float) -> list[dict]:
    """An adaptor's parameters as two groups: llm_proj at `llm_proj_lr_scale` x the rate, the rest at 1x."""
    proj = {id(p) for p in model.llm_proj.parameters()}
    return [{"params": [p for p in model.parameters() if id(p) not in proj], "lr_scale": 1.0},
            {"params": list(model.llm_proj.parameters()), "lr_scale": llm_proj_lr_scale}]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank) % (2**63 - 1)


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, step, rank))


@functools.lru_cache(maxsize=2)  # this epoch's, and the next one's once the prefetch thread reaches it
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch, the same on every rank and in every resumed run: drawn once
    per epoch (a permutation of 10^7 rows takes 0.74 s; drawn for every step, twice a step, it
    outgrew the step itself), kept read-only as int32 where the rows fit (4 B a row, not 8)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).numpy()
    order = order.astype(np.int32) if n < 2**31 else order
    order.flags.writeable = False
    return order


def global_batch(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Indices of global step `step`: epochs are consecutive permutations; a short tail wraps."""
    steps_per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, steps_per_epoch)
    order = epoch_order(n, seed, epoch)
    return order[pos * batch_size:(pos + 1) * batch_size].tolist()


def require_batch_splits(batch_size: int, world: int) -> None:
    """rank_slice gives every rank batch_size // world rows: a remainder would be dropped unseen."""
    if batch_size % world:
        raise BlitextError(f"batch_size {batch_size} must divide by the number of ranks x --accum-steps ({world}): "
                           f"pass a --batch-size that does")


def rank_slice(indices: list[int], rank: int, world: int) -> list[int]:
    per = len(indices) // world
    return indices[rank * per:(rank + 1) * per]


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors averaged over every rank (each rank's own values when not distributed)."""
    stacked = torch.stack([v.detach().float() for v in values.values()])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(stacked)
        stacked /= torch.distributed.get_world_size()
    return dict(zip(values, stacked.tolist()))


def token_share(mask: torch.Tensor, world: int) -> torch.Tensor | float:
    """world x this rank's share of the global batch's tokens (mask: this rank's, 1 = token).

    A token-mean loss scaled by this makes DDP's average of the ranks' gradients the gradient
    of the mean over the whole global batch's tokens (what one process computes), however the
    tokens fall on ranks."""
    if world == 1:
        return 1.0
    n = mask.sum().float()
    total = n.detach().clone()
    torch.distributed.all_reduce(total)
    return n * world / total


class Prefetcher:
    """Loads step s+1's batch in a background thread while step s computes.

    `load(step)` does the I/O (cache reads, image decoding); `next()` returns the batches in
    step order and adds the time it blocked to `waited` (the data wait of the step's time).
    """

    def __init__(self, load: Callable[[int], object], steps: range, depth: int = 2):
        self.waited = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(load, steps), daemon=True)
        self._thread.start()

    def _run(self, load, steps) -> None:
        for step in steps:
            try:
                item = (load(step), None)
            except BaseException as e:  # re-raised in the training thread, where it can be reported
                item = (None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or item[1] is not None:
                return

    def next(self):
        t = time.perf_counter()
        batch, error = self._queue.get()
        self.waited += time.perf_counter() - t
        if error is not None:
            raise error
        return batch

    def close(self) -> None:
        self._stop.set()


class MetricsLog:
    """metrics.jsonl: one line per logged step. On resume, lines past the resumed step are
    dropped first, so a killed-and-resumed run has each step exactly once.

    A line is appended whole or not at all: one os.write, and on a failure (a full disk) the
    file is cut back to its previous size, so the run stops with one line and resumes later. A
    torn last line (left by a kill mid-write, or by versions before this one) is dropped on resume."""

    def __init__(self, path: Path, resume_step: int | None = None, trackers=None):
        self.path, self.trackers = Path(path), trackers
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = [line for line in _whole_lines(self.path) if json.loads(line).get("step", -1) < resume_step]
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            with writing(self.path.parent, then=RESUME_LATEST):
                tmp.write_text("".join(line + "\n" for line in kept))
                publish(tmp, self.path)  # fsynced before the rename: a crash leaves the old log or the new one

    def write(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        with writing(self.path.parent, then=RESUME_LATEST):
            _append_whole(self.path, line)
        if self.trackers is not None:
            self.trackers.log(record)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()


def _append_whole(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, line) != len(line):  # cut short: the disk filled mid-line
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        except OSError:
            os.ftruncate(fd, size)  # shrinking needs no space: the file is as it was before the line
            raise
    finally:
        os.close(fd)


def _whole_lines(path: Path) -> list[str]:
    """The log's lines; a torn last line is dropped with a message, a damaged line elsewhere refused."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            json.loads(line)
        except ValueError:
            if i < len(lines) - 1:
                raise BlitextError(f"{path} line {i + 1} is damaged ({line[:40]!r}): delete that line, "
                                   f"then {RESUME_LATEST}") from None
            say(f"[yellow]dropped[/] the torn last line of {path} ({line[:40]!r}): a write was cut short; "
                f"the resumed run logs that step again")
            return lines[:-1]
    return lines


@contextlib.contextmanager
def tracking(metrics: MetricsLog | None):
    """Close the run's trackers when its loop ends, finished or interrupted (a resumed run's W&B
    session continues the same run)."""
    try:
        yield
    finally:
        if metrics is not None:
            metrics.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in _whole_lines(Path(path))]


def open_run(run: Path, info, start: int, name: str, config=None):
    """(rank 0's metrics log or None, this rank's logger) of a run folder rank 0 creates; a
    resumed run's metrics log drops lines past `start`, which the run writes again. The config's
    `report_to` trackers (blitext.trackers) get every line too."""
    in_turn((lambda: run.mkdir(parents=True, exist_ok=True)) if info.is_main else None, f"making the run folder {run}")
    metrics = None
    if info.is_main:
        report_to = getattr(config, "report_to", None) or []
        trackers = Trackers(report_to, run, name, to_jsonable(config), start) if report_to else None
        metrics = MetricsLog(run / "metrics.jsonl", resume_step=start if start else None, trackers=trackers)
    return metrics, rank_logger(name, run / "logs")

