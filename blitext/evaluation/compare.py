"""`blitext compare` and the tables the evaluations print: metrics.json files side by side.

An evaluation's record (`metrics.json`) holds its metrics and, for VQA, the text ceiling and the
majority-answer base rate beside them (`beside_scores`); `compare_runs` lines several runs' records
up by evaluation and metric, `print_compare` and `print_metrics` draw them with rich. A metric the
record lists as `undefined` (BLEU-4 over 3-word captions) keeps its number in the record, as
pycocoevalcap computes it, and is drawn as "n/a" with the reason under the table.
"""
from __future__ import annotations

from pathlib import Path

from blitext.atomic import read_json
from blitext.console import console, say
from blitext.errors import BlitextError

CEILING = "text ceiling (caption as text)"  # labels of the columns / rows beside a VQA score
BASE_RATE = "majority answer"
VOID = "n/a"  # the cell of a metric whose number measures nothing on the evaluated set


class Void(str):
    """compare_runs' cell of a metric its record calls undefined: reads "n/a", keeps the reason."""

    def __new__(cls, reason: str):
        void = super().__new__(cls, VOID)
        void.reason = reason
        return void


def void_notes(rows: list[list]) -> dict[str, str]:
    """Each "n/a" metric of compare_runs' rows, with its reason."""
    return {row[1]: value.reason for row in rows for value in row[2:] if isinstance(value, Void)}


def beside_scores(record: dict) -> dict[str, dict]:
    """A VQA evaluation's text ceiling and majority-answer base rate, by label ({} for the others)."""
    found = {CEILING: (record.get("text_ceiling") or {}).get("metrics"), BASE_RATE: record.get("base_rate")}
    return {label: metrics for label, metrics in found.items() if metrics}


def print_metrics(title: str, metrics: dict, beside: dict[str, dict] | None = None, label: str = "adaptor",
                  undefined: dict[str, str] | None = None) -> None:
    """One row per metric; `beside` adds a column per labelled set of the same metrics (VQA's ceiling),
    the metrics' own column then being `label`; `undefined` metrics' cells read "n/a"."""
    from rich.table import Table

    beside = beside or {}
    columns = [{**_flatten(metrics), **dict.fromkeys(undefined or {}, VOID)}, *(_flatten(m) for m in beside.values())]
    table = Table("metric", label if beside else "value", *beside, title=title)
    for name in dict.fromkeys(k for column in columns for k in column):
        table.add_row(name, *(cell(column.get(name)) for column in columns))
    console.print(table)


def say_unscored(extra: dict) -> None:
    """One line per metric an evaluation did not compute, or computed but cannot be read as a score."""
    for name, why in extra.get("unavailable", {}).items():
        say(f"[yellow]{name} not computed[/]: {why}")
    for name, why in extra.get("undefined", {}).items():
        say(f"[yellow]{name} n/a[/]: {why}")


def cell(value) -> str:
    """A table cell: 4 decimals for a float, "-" for a metric a run lacks."""
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves only, nested keys joined by "/" (per_answer_type/other)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = value
    return out


def metrics_files(path: Path) -> list[Path]:
    """A metrics.json, a folder holding one, or a run folder with eval/*/metrics.json."""
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / "metrics.json").is_file():
        return [path / "metrics.json"]
    found = sorted(path.glob("eval/*/metrics.json")) + sorted(path.glob("*/eval/*/metrics.json"))
    if not found:
        raise BlitextError(f"{path} holds no metrics.json (nor eval/*/metrics.json): pass an eval output folder "
                           f"or a run folder that `blitext eval` wrote into")
    return found


def compare_runs(paths: list[Path]) -> tuple[list[list], list[str]]:
    """Every numeric metric side by side: rows [eval, metric, value per path (None if absent, a Void
    "n/a" with its reason where the record lists it as undefined)], columns ["eval", "metric", label
    per path]. An eval is `<task>-<data name>`, so the same evaluation of several runs lines up on one
    row. VQA evaluations add their text ceiling's and base rate's metrics as rows "text ceiling
    (caption as text)/accuracy", ...."""
    if not paths:
        raise BlitextError("compare needs metrics files or run folders")
    labels = _labels([Path(p) for p in paths])
    values: dict[tuple[str, str], dict[int, float]] = {}
    for column, path in enumerate(paths):
        seen: set[str] = set()
        for file in metrics_files(Path(path)):
            record = read_json(file)
            if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
                raise BlitextError(f"{file} is not a blitext eval metrics.json (no \"metrics\" table)")
            name = record.get("eval") or file.parent.name
            name = f"{name} ({file.parent.name})" if name in seen else name
            seen.add(name)
            undefined = record.get("undefined") or {}
            for metric, value in _flatten({**record["metrics"], **beside_scores(record)}).items():
                values.setdefault((name, metric), {})[column] = Void(undefined[metric]) if metric in undefined else value
    rows = [[name, metric, *(by_column.get(c) for c in range(len(paths)))]
            for (name, metric), by_column in values.items()]
    return rows, ["eval", "metric", *labels]


def _labels(paths: list[Path]) -> list[str]:
    """The shortest path tails that tell the paths apart (runA/final vs runB/final -> runA/final ...)."""
    parts = [(p.parent if p.is_file() else p).resolve().parts for p in paths]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def print_compare(rows: list[list], columns: list[str]) -> None:
    """compare_runs' table, then a line for each "n/a" metric saying why."""
    from rich.table import Table

    table = Table(*columns, title="blitext compare")
    for row in rows:
        table.add_row(*(cell(v) for v in row))
    console.print(table)
    say_unscored({"undefined": void_notes(rows)})
