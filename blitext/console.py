"""Console output on rank 0 (rich), a log file per rank, and rate-limited warnings."""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from blitext.atomic import writing
from blitext.distributed import dist_info

console = Console(stderr=True)


def say(message: str, soft_wrap: bool = False) -> None:
    """Print on rank 0 only. soft_wrap: one line whatever the width (a path to copy, never folded)."""
    if dist_info().is_main:
        console.print(message, soft_wrap=soft_wrap)


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


@contextlib.contextmanager
def progress_bar(total: int, description: str, unit: str) -> Iterator:
    """Yields `advance(n, **fields)`; draws a bar with rate and ETA on rank 0 only."""
    if not dist_info().is_main:
        yield lambda n=1, **fields: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str = "") -> None:
            bar.update(task, advance=n, status=status)

        yield advance


class _LogFile(logging.FileHandler):
    """A log file whose write failures (a full disk) are dropped silently: logging would print
    a traceback for each line, and the write that matters (a shard, a checkpoint) reports the
    fault in one line."""

    def handleError(self, record: logging.LogRecord) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)


def rank_logger(name: str, log_dir: Path) -> logging.Logger:
    """A logger writing to `log_dir/<name>.rank<r>.log` (every rank keeps its own file)."""
    info = dist_info()
    logger = logging.getLogger(f"blitext.{name}.{log_dir}.{info.rank}")
    if not logger.handlers:
        with writing(log_dir.parent):
            log_dir.mkdir(parents=True, exist_ok=True)
            handler = _LogFile(log_dir / f"{name}.rank{info.rank}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class RateLimitedWarnings:
    """Shows the first `limit` warnings on the console; every one goes to the log file."""

    def __init__(self, logger: logging.Logger, limit: int = 5):
        self.logger, self.limit, self.count = logger, limit, 0

    def warn(self, message: str) -> None:
        self.count += 1
        self.logger.warning(message)
        if self.count <= self.limit:
            say(f"[yellow]skipped[/] {message}")
        elif self.count == self.limit + 1:
            say("[yellow]... further skipped items are only written to the log file[/]")
