"""PNG curves from runs' metrics.jsonl: one panel per metric, one line per run.

A run's metrics.jsonl (written by training.MetricsLog) holds one JSON object a line:
training lines {"step", "lr", "loss", <loss terms>, "sentences_per_s", ...} and sparser
evaluation lines {"step", "heldout_token_accuracy", "samples": [...]}. Each key is its own
series of (step, value) points taken from the lines that carry it, so evaluation metrics
plot at their own steps beside the training ones.

Only the standard library is imported at module level: matplotlib loads inside plot_runs,
with the Agg backend (no display needed), so `import blitext.plot` is cheap.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from blitext.atomic import publish
from blitext.errors import BlitextError

METRICS_FILE = "metrics.jsonl"
X_KEY = "step"
RATE_SUFFIX = "_per_s"    # throughput (sentences_per_s, ...): machine speed, not learning; off by default
LOG_SPAN = 100.0          # a panel gets a log y-axis when its values are all > 0 and max/min exceeds this
PANEL_COLUMNS = 3         # panels per row of the grid
PANEL_SIZE = (4.8, 3.2)   # inches per panel
MARKERS_BELOW = 12        # panels whose longest series is shorter (evaluation lines) get a dot per point


def metrics_path(run: Path) -> Path:
    """The metrics file of a run: `run` itself if it is a file, else run/metrics.jsonl."""
    run = Path(run)
    path = run if run.is_file() else run / METRICS_FILE
    if not path.is_file():
        raise BlitextError(f"no {METRICS_FILE} at {path}: pass a run folder (the one training wrote "
                           f"{METRICS_FILE} into) or the .jsonl file itself")
    return path


def read_records(path: Path) -> list[dict]:
    """The JSON objects of a metrics file. A cut-off last line (a run killed, or still
    writing, mid-line) is skipped; a bad line anywhere else is an error."""
    lines = [(i, line) for i, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
    if not lines:
        raise BlitextError(f"{path} is empty: the run logged no step yet; plot it after its first log line")
    records = []
    for n, (i, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) - 1 and records:
                break
            raise BlitextError(f"{path} line {i} is not JSON ({e.msg}): {line[:80]!r}; "
                               f"fix or delete that line") from None
        if not isinstance(record, dict) or not is_number(record.get(X_KEY)):
            raise BlitextError(f"{path} line {i} is not an object with a numeric {X_KEY!r}: {line[:80]!r}; "
                               f"fix or delete that line")
        records.append(record)
    return records


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_keys(records: list[dict]) -> list[str]:
    """Keys with at least one numeric value, in first-seen order, without the x key."""
    seen: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key != X_KEY and is_number(value):
                seen.setdefault(key)
    return list(seen)


def plot_keys(records_by_run: dict[str, list[dict]], keys: list[str] | None) -> list[str]:
    """The panels to draw, in order.

    keys=None (or empty): every numeric key of any run except the step, rates (`*_per_s`) and
    series flat in every run (a term the phase does not train, e.g. stage 2's ITC temperature), "loss"
    first, then in the order the runs first logged them. Given keys: exactly those,
    duplicates dropped; each must be numeric in at least one run (rates may be asked for).
    """
    available: dict[str, None] = {}
    for records in records_by_run.values():
        available.update(dict.fromkeys(numeric_keys(records)))
    if keys:
        missing = [k for k in keys if k not in available]
        if missing:
            raise BlitextError(f"no run logs a numeric {', '.join(map(repr, missing))}; "
                               f"choose keys from: {', '.join(available) or '(none)'}")
        return list(dict.fromkeys(keys))
    chosen = [k for k in available if not k.endswith(RATE_SUFFIX) and not constant(records_by_run, k)]
    chosen.sort(key=lambda k: k != "loss")  # stable: only moves "loss" to the front
    if not chosen:
        raise BlitextError(f"the runs log no changing numeric metric besides {X_KEY!r} and rates "
                           f"({', '.join(available) or 'none'}); nothing to plot (--keys draws constant ones)")
    return chosen


def constant(records_by_run: dict[str, list[dict]], key: str) -> bool:
    """Whether each run logged `key` at one value of its own: a panel of flat lines says nothing. Stage 2's
    ITC temperature is flat in every run, but at each run's stage-1 value, so the runs' values differ.
    A run that logged `key` once tells nothing either way; at least one run must have two points."""
    values = [series(records, key)[1] for records in records_by_run.values()]
    flat = [len(set(v)) == 1 for v in values if len(v) > 1]
    return bool(flat) and all(flat)


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`, sorted by step; a step logged twice keeps its last value.
    Non-finite values (a loss gone NaN) are left out, so the line stops there."""
    by_step: dict[float, float] = {}
    for record in records:
        value = record.get(key)
        if is_number(value) and math.isfinite(value):
            by_step[record[X_KEY]] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values; the first points average what there is,
    so the result is as long as the input and starts at values[0]."""
    if window < 1:
        raise BlitextError(f"smoothing window {window} must be at least 1 (1 = no smoothing)")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def run_labels(runs: list[Path]) -> list[str]:
    """Each run's folder name (a file not named metrics.jsonl: its stem), lengthened with
    parent folders (parent/name) until no two runs share one; same path twice: ' (2)'."""
    bases = [Path(r).resolve() for r in runs]
    bases = [b.parent if b.name == METRICS_FILE else b.with_suffix("") if b.suffix == ".jsonl" else b for b in bases]
    distinct = list(dict.fromkeys(bases))  # the same run given twice is told apart below, by number
    names = {b: b.name for b in distinct}
    depth = 1
    while len(set(names.values())) < len(names) and depth < max(len(b.parts) - 1 for b in distinct):
        depth += 1
        counts = list(names.values())
        names = {b: "/".join(b.parts[-depth:]) if counts.count(name) > 1 else name for b, name in names.items()}
    labels = [names[b] for b in bases]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return unique


def wants_log_scale(values: list[float]) -> bool:
    return bool(values) and min(values) > 0 and max(values) / min(values) > LOG_SPAN


def plot_runs(runs: list[Path], out: Path, keys: list[str] | None = None, smooth: int = 1,
              labels: list[str] | None = None) -> Path:
    """Draw the runs' metrics into one PNG at `out` (written atomically) and return `out`.

    runs: run folders or metrics .jsonl files. keys: the panels, in order (see plot_keys).
    smooth: trailing moving-average window in logged points; above 1 the raw curve stays
    behind the smoothed one, faint. labels: legend names, one per run (default run_labels).
    """
    if not runs:
        raise BlitextError("no run given: pass at least one run folder or metrics.jsonl")
    if smooth < 1:
        raise BlitextError(f"smooth {smooth} must be at least 1 (1 = no smoothing)")
    if labels is not None and len(labels) != len(runs):
        raise BlitextError(f"{len(labels)} labels for {len(runs)} runs: give one label per run, in order")
    names = list(labels) if labels is not None else run_labels(runs)
    if len(set(names)) < len(names):
        raise BlitextError(f"labels {names} repeat: give each run its own label")
    records_by_run = {name: read_records(metrics_path(run)) for name, run in zip(names, runs)}
    panels = plot_keys(records_by_run, keys)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ncols = min(PANEL_COLUMNS, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, sharex=True, squeeze=False, layout="constrained",
                             figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows + 0.4))
    try:
        colors = {name: f"C{i % 10}" for i, name in enumerate(records_by_run)}
        flat = axes.ravel()
        for ax, key in zip(flat, panels):
            drawn = {name: series(records, key) for name, records in records_by_run.items()}
            longest = max(len(values) for _, values in drawn.values())
            all_values = [v for _, values in drawn.values() for v in values]
            for name, (steps, values) in drawn.items():
                marker = "o" if longest < MARKERS_BELOW or len(values) == 1 else None
                if smooth > 1:
                    ax.plot(steps, values, color=colors[name], alpha=0.25, linewidth=0.8)
                    values = moving_average(values, smooth)
                ax.plot(steps, values, color=colors[name], linewidth=1.4, marker=marker, markersize=3)
            if wants_log_scale(all_values):
                ax.set_yscale("log")
            ax.set_title(key + (f" (smoothed over {smooth})" if smooth > 1 else ""), fontsize=10)
            ax.grid(True, alpha=0.3)
        for i, ax in enumerate(flat):
            if i >= len(panels):
                ax.set_visible(False)
            elif i + ncols >= len(panels):  # lowest drawn panel of its column: show its step ticks
                ax.xaxis.set_tick_params(labelbottom=True)
                ax.set_xlabel(X_KEY)
        handles = [Line2D([], [], color=colors[name], linewidth=1.4) for name in records_by_run]
        fig.legend(handles, list(records_by_run), loc="outside upper center",
                   ncols=min(len(handles), 4), frameon=False)
        return save_png(fig, out)
    finally:
        plt.close(fig)


def save_png(fig, out: Path) -> Path:
    """The figure as a PNG at `out`, written whole or not at all (temp file, fsync, rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        publish(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
