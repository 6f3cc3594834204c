"""The trainer skeleton the P-Former, Q-Former (stages 1, 2) and video trainers share: resuming,
the run's precision, the step loop (batches read ahead, a progress bar with rate and ETA, a
metrics line every log_every steps, a checkpoint every save_every steps) and the final save.
Each trainer subclasses `TrainerLoop` with its own `train_step` and, where it needs them, the
hooks below; everything else is written here once.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from blitext.atomic import read_json
from blitext.caption_counts import CaptionCounts, summary_line
from blitext.checkpoint import (STATE, export_final, latest_checkpoint, load_checkpoint, resolve_resume,
                                 save_checkpoint)
from blitext.console import progress_bar, say
from blitext.distributed import in_turn
from blitext.errors import BlitextError
from blitext.trackers import require_trackers
from blitext.training import Prefetcher, mean_over_ranks, rank_slice, token_share

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class RunOptions:
    """How a trainer runs, the same options for each (their configs extend this)."""
    accum_steps: int = 1                # micro-batches per step, gradients summed (LM loss: as one batch)
    save_every: int = 1000              # steps between resumable checkpoints (and one at the end)
    snapshot_steps: list[int] = field(default_factory=list)  # also keep the weights after these steps, never
                                        # pruned, in <run>/snapshots/ (a budget curve from one run's schedule)
    log_every: int = 10                 # steps between metrics.jsonl lines
    precision: str = "auto"             # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16 | fp16 (GPU)
    grad_checkpointing: bool = False    # recompute the frozen LLM's activations in the backward pass
    report_to: list[str] = field(default_factory=list)  # tensorboard | wandb (optional), beside metrics.jsonl
    device: str = "auto"
    resume: str | None = None           # "latest" or a checkpoints/step-N folder

    def __post_init__(self) -> None:
        self.report_to = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        self.snapshot_steps = sorted({int(s) for s in self.snapshot_steps})
        if any(s < 1 for s in self.snapshot_steps):
            raise BlitextError(f"--snapshot-steps {self.snapshot_steps}: steps count from 1 (the weights after step N)")
        require_trackers(self.report_to)
        require_precision(self.precision)
        if self.accum_steps < 1:
            raise BlitextError(f"--accum-steps {self.accum_steps}: pass 1 (no accumulation) or more")


def require_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise BlitextError(f"--precision {precision!r}: use auto (bf16 on a GPU, fp32 on CPU), fp32, bf16 or fp16 (GPU)")


class Precision:
    """The autocast a step's forward runs under, and fp16's loss scaler."""

    def __init__(self, precision: str, device: str):
        require_precision(precision)
        cuda = str(device).startswith("cuda")
        if precision == "fp16" and not cuda:
            raise BlitextError("--precision fp16 needs a GPU (float16 autocast with loss scaling); on CPU use bf16 or fp32")
        dtype = {"auto": torch.bfloat16 if cuda else None, "fp32": None, "bf16": torch.bfloat16,
                 "fp16": torch.float16}[precision]
        self.autocast = torch.autocast("cuda" if cuda else "cpu", dtype) if dtype else torch.autocast("cpu", enabled=False)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def update(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> None:
        """One update from the summed gradients, their global norm clipped first when `max_grad_norm`
        is set (fp16: on the unscaled gradient, and a step with inf/nan gradients is skipped)."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if self.scaler is None:
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            return
        if max_grad_norm:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        """What a checkpoint keeps of fp16's loss scaler (its scale and growth count): a resume that
        started again from 65,536 would skip steps to find again the scale the run had found."""
        return {} if self.scaler is None else {"grad_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """The scaler as a checkpoint left it (checkpoints without one keep the fresh scaler)."""
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])


def resume_run(run: Path, config, model, optimizer, identity: dict) -> tuple[int, dict]:
    """(the step to start from, the checkpoint's state): 0 and {} for a new run."""
    path = resolve_resume(run, config.resume)
    if path is None:
        if config.resume is None and latest_checkpoint(run) is not None:
            raise BlitextError(f"{run} already holds a run; pass --resume latest to continue it or another --out")
        return 0, {}
    state = load_checkpoint(path, model, optimizer, expect=identity)
    say(f"resuming from {path} (step {state['step']})")
    return int(state["step"]), state


def snapshot_root(run: Path) -> Path:
    """Where --snapshot-steps keeps its weights: <run>/snapshots/checkpoints/step-N (save_checkpoint's layout)."""
    return Path(run) / "snapshots"


def snapshots(run: Path) -> dict[int, Path]:
    """{step: folder} of a run's snapshots, in step order."""
    folders = sorted((snapshot_root(run) / "checkpoints").glob("step-*"))
    return {int(f.name.split("-")[1]): f for f in folders if f.is_dir()}


def finish_run(run: Path, steps: int, model, state: dict, info, weights=None, extra=None) -> Path:
    """The last checkpoint (no optimizer) published as `<run>/final`, and the run's caption counts
    said; every rank waits for it."""
    def publish() -> None:
        save_checkpoint(run, steps, model, None, state, keep=2, weights=weights, extra=extra)
        export_final(run)
        line = summary_line(state)
        if line:
            say(line)

    in_turn(publish if info.is_main else None, f"saving {run / 'final'}")
    return run / "final"


class TrainerLoop:
    """Subclasses set `title`, `unit` and `rate_name`, and implement `train_step(step, steps, batch)`
    returning the step's losses (floats, already averaged over ranks)."""
    title = "train"
    unit = "pair"
    rate_name = "pairs_per_s"
    captions: CaptionCounts | None = None  # the trainer's caption counts, saved in every checkpoint

    def __init__(self, config, model, device: str, info, metrics, log):
        self.c, self.model = config, model  # the unwrapped model checkpoints save
        self.device, self.info, self.metrics, self.log = device, info, metrics, log
        self.precision = Precision(config.precision, device)
        self.autocast = self.precision.autocast
        self.accum, self.micro, self.step_tokens = config.accum_steps, 0, None

    # ------------------------------------------------------------ accumulation (docs/method.md#memory-levers)
    @property
    def rank(self) -> int:
        """The slice of the global batch the current micro-batch is: micro-batch m of rank r is slice
        r * accum + m of rank_slice(..., world * accum), so a step's rows are the same at any accum."""
        return self.info.rank * self.accum + self.micro

    @property
    def world(self) -> int:
        return self.info.world * self.accum

    def token_share(self, mask: torch.Tensor) -> torch.Tensor | float:
        """`world` x this micro-batch's share of the step's loss tokens (training.token_share over
        micro-batches too), so token-mean losses summed over micro-batches equal the whole batch's."""
        if self.accum == 1:
            return token_share(mask, self.info.world)
        return mask.sum().float() * self.world / self.step_tokens

    def accumulated(self, micro_step, per_row: tuple, count_tokens, forward, max_grad_norm: float | None) -> dict:
        """One optimizer step over `accum` micro-batches. `per_row` holds this rank's row tensors (or
        None) for the step; `micro_step(*per_row of the micro-batch)` returns (losses, total), and
        each total / accum is backpropagated, the gradients summed (DDP syncs on the last one).
        `count_tokens()`, called only when accumulating, gives this rank's LM-loss tokens over the
        whole step (None without an LM term), summed over ranks for token_share. Returns the step's
        losses averaged over micro-batches and ranks."""
        tokens = count_tokens() if self.accum > 1 else None
        if tokens is not None:
            self.step_tokens = torch.as_tensor(tokens, dtype=torch.float32).clone()
            if self.info.world > 1:
                torch.distributed.all_reduce(self.step_tokens)
        self.optimizer.zero_grad(set_to_none=True)
        logged: dict[str, torch.Tensor] = {}
        try:
            for m in range(self.accum):
                self.micro = m
                part = per_row
                if self.accum > 1 and per_row:
                    rows = rank_slice(list(range(len(per_row[0]))), m, self.accum)
                    part = tuple(None if t is None else t[rows] for t in per_row)
                last = m == self.accum - 1
                with (contextlib.nullcontext() if last or not hasattr(forward, "no_sync") else forward.no_sync()):
                    with self.autocast:
                        losses, total = micro_step(*part)
                    self.precision.backward(total / self.accum)  # / 1 is exact: no accumulation, same bits
                for k, v in {**losses, "loss": total}.items():
                    v = v.detach() / self.accum
                    logged[k] = logged[k] + v if k in logged else v
        finally:
            self.micro = 0
        self.precision.update(self.optimizer, max_grad_norm)
        return mean_over_ranks(logged)

    # ------------------------------------------------------------ hooks
    def load(self, step: int):
        """The step's I/O, run ahead in a thread (cache reads); None when the step reads nothing."""
        return None

    def train_step(self, step: int, steps: int, batch) -> dict[str, float]:
        raise NotImplementedError

    def record_fields(self, step: int) -> dict:
        """More fields of the step's metrics line (the phase, the temperature)."""
        return {}

    def checkpoint_state(self, state: dict) -> dict:
        """The state a checkpoint saves, with the caption counts so far (a resume counts on from them)."""
        return state if self.captions is None else {**state, **self.captions.state()}

    def checkpoint_weights(self):
        """What a checkpoint stores as model.safetensors (None: the trainable parameters)."""
        return None

    def checkpoint_extra(self, folder: Path) -> None:
        """More files in a checkpoint (the Q-Former's tokenizer)."""

    def after_step(self, step: int, steps: int) -> None:
        """Run after each step's record (the P-Former's held-out samples)."""

    # ------------------------------------------------------------ the loop
    def run(self, start: int, steps: int, run: Path, optimizer, state: dict) -> None:
        self.optimizer = optimizer
        if start > 0:  # resuming: the checkpoint resume_run loaded the weights and moments from
            self.precision.load_state_dict(read_json(resolve_resume(run, self.c.resume) / STATE))
        prefetch = Prefetcher(self.load, range(start, steps), getattr(self.c, "prefetch", 2))
        try:
            with progress_bar(steps - start, self.title, self.unit) as advance:
                for step in range(start, steps):
                    t, waited = time.perf_counter(), prefetch.waited
                    losses = self.train_step(step, steps, prefetch.next())
                    took = time.perf_counter() - t
                    timing = {self.rate_name: self.c.batch_size / took, "data_wait": (prefetch.waited - waited) / took}
                    advance(1, status=self.status(step, losses, timing))
                    self.record(step, losses, timing)
                    self.after_step(step, steps)
                    if (step + 1) % self.c.save_every == 0 and step + 1 < steps and self.info.is_main:
                        save_checkpoint(run, step + 1, self.model, optimizer,
                                        {**self.checkpoint_state(state), **self.precision.state_dict()},
                                        weights=self.checkpoint_weights(), extra=self.checkpoint_extra)
                    if step + 1 in self.c.snapshot_steps and self.info.is_main:
                        save_checkpoint(snapshot_root(run), step + 1, self.model, None, self.checkpoint_state(state),
                                        keep=0, weights=self.checkpoint_weights(), extra=self.checkpoint_extra)
        finally:
            prefetch.close()

    def status(self, step: int, losses: dict, timing: dict) -> str:
        phase = self.record_fields(step).get("phase")
        return (f"{phase}: " if phase else "") + " ".join(f"{k} {v:.3f}" for k, v in losses.items()) + \
            f" | wait {timing['data_wait']:.0%}"

    def record(self, step: int, losses: dict, timing: dict) -> None:
        if self.metrics is None or (step + 1) % self.c.log_every and step != 0:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        fields = self.record_fields(step)
        self.metrics.write({"step": step, **{k: v for k, v in fields.items() if k == "phase"}, "lr": lr, **losses,
                            **timing, **{k: v for k, v in fields.items() if k != "phase"}})
        self.log.info("step %d lr %.2e %s %s %s", step, lr, fields, losses, timing)
