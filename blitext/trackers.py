"""`--report-to tensorboard|wandb`: every line a trainer writes to metrics.jsonl also goes to
TensorBoard (an event file under <run>/tensorboard) and/or Weights & Biases in offline mode
(under <run>/wandb; `wandb sync` uploads it later). Both are optional dependencies
(`pip install tensorboard` / `pip install wandb`); metrics.jsonl stays the record blitext reads.

On resume TensorBoard drops its events past the resumed step (`purge_step`), as metrics.jsonl
drops its lines, and W&B continues the same offline run (its id is kept in the run folder).
"""
from __future__ import annotations

import atexit
import numbers
from pathlib import Path

from blitext.errors import BlitextError

TRACKERS = ("tensorboard", "wandb")


def require_trackers(names: list[str]) -> None:
    """Refuse unknown names at config time, and trackers whose package is not installed."""
    for name in names:
        if name not in TRACKERS:
            raise BlitextError(f"--report-to {name!r}: use tensorboard or wandb (or leave it out: metrics.jsonl "
                               f"is always written)")
        module = "torch.utils.tensorboard" if name == "tensorboard" else "wandb"
        try:
            __import__(module)
        except ImportError:
            raise BlitextError(f"--report-to {name}: the {name} package is not installed; pip install {name} "
                               f"(or leave --report-to out)") from None


class Trackers:
    """The run's trackers; `log` takes a metrics.jsonl record (its numbers become scalars)."""

    def __init__(self, names: list[str], run: Path, job: str, config: dict, start: int):
        self.writers = []
        for name in names:
            self.writers.append(_tensorboard(run, start) if name == "tensorboard" else _wandb(run, job, config))
        atexit.register(self.close)

    def log(self, record: dict) -> None:
        step = record.get("step")
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}
        if step is None or not scalars:
            return
        for writer in self.writers:
            writer.log(int(step), scalars)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []


class _TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def log(self, step: int, scalars: dict) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps every step it logged

    def close(self) -> None:
        self.writer.close()


def _tensorboard(run: Path, start: int) -> _TensorBoard:
    from torch.utils.tensorboard import SummaryWriter

    return _TensorBoard(SummaryWriter(log_dir=str(run / "tensorboard"), purge_step=start or None))


class _WandB:
    def __init__(self, session):
        self.session = session

    def log(self, step: int, scalars: dict) -> None:
        self.session.log(scalars, step=step)

    def close(self) -> None:
        self.session.finish()


def _wandb(run: Path, job: str, config: dict) -> _WandB:
    import uuid

    import wandb

    id_file = run / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    session = wandb.init(project="blitext", name=f"{job} {run.name}", id=run_id, resume="allow", mode="offline",
                         dir=str(run), config=config)
    return _WandB(session)
