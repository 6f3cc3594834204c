"""`blitext report`: one self-contained HTML page a person looks at, from runs that `blitext eval` wrote into.

The page holds, images inline (base64) so that it opens anywhere as one file:
- the comparison table (`blitext compare`'s rows) and one verdict line per comparison;
- a grid of test images, each with its human caption and every run's caption (wrong ones marked);
- accuracy per class where the captions name classes (easy-VQA's "a <colour> <shape>": per colour,
  per shape and per combination);
- the loss curves (blitext.plot, constant panels left out);
- the budget curve when the runs' folder holds a `budget.json` (see read_budget).
"""
from __future__ import annotations

import base64
import html
import io
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from blitext.atomic import read_json
from blitext.errors import BlitextError
from blitext.evaluation.compare import cell, compare_runs, metrics_files, void_notes
from blitext.metrics.caption import _plain as plain_caption  # exact match's normalisation, the one eval uses

HEADLINE = ("exact_match", "CIDEr", "accuracy")  # the metrics a verdict line compares, where an eval has them
BUDGET_FILE = "budget.json"


@dataclass
class ReportConfig:
    runs: list[str] = field(default_factory=list)  # stage-2 (or video) run folders that `blitext eval` wrote into
    out: str = "report.html"
    labels: list[str] | None = None  # one name per run (default: the shortest path tails that tell them apart)
    budget: str | None = None        # a budget.json (default: the one beside the runs, if any)
    images: int = 24                 # test images in the grid
    thumbnail: int = 128             # pixels on a thumbnail's longer side
    title: str = "blitext report"
    verdicts: list[str] | None = None  # the lines the caller already printed (the demo's); default: from the evals


@dataclass
class RunEvals:
    label: str
    path: Path
    records: list[dict]              # every eval's metrics.json, with "_dir" (its folder)

    def caption_eval(self) -> dict | None:
        return next((r for r in self.records if r.get("task") == "caption"), None)


def write_report(config: ReportConfig) -> Path:
    """Write the page to config.out (atomically) and return its path."""
    from blitext.atomic import write_text
    from blitext.plot import run_labels

    if not config.runs:
        raise BlitextError("report needs at least one run folder (one that `blitext eval` wrote into)")
    paths = [Path(r) for r in config.runs]
    labels = config.labels or run_labels(paths)
    if len(labels) != len(paths):
        raise BlitextError(f"{len(labels)} labels for {len(paths)} runs: give one label per run, in order")
    runs = [RunEvals(label, path, load_records(path)) for label, path in zip(labels, paths)]
    rows, columns = compare_runs(paths)
    void = "".join(f"<p>{html.escape(f'{name} n/a: {why}')}</p>" for name, why in void_notes(rows).items())
    sections = [section("Comparison", table_html([*columns[:2], *labels], rows) + void),
                section("Verdicts", "<ul>" + "".join(f"<li>{html.escape(v)}</li>" for v in (config.verdicts or verdicts(runs))) + "</ul>")]
    grid, classes = caption_sections(runs, config)
    sections += [grid, classes, curves_section(runs), budget_section(runs, config.budget)]
    page = PAGE.format(title=html.escape(config.title), body="\n".join(s for s in sections if s))
    out = Path(config.out)
    write_text(out, page)
    return out


def load_records(run: Path) -> list[dict]:
    records = []
    for file in metrics_files(run):
        record = read_json(file)
        if isinstance(record, dict) and isinstance(record.get("metrics"), dict):
            records.append({**record, "_dir": file.parent})
    return records


def verdicts(runs: list[RunEvals]) -> list[str]:
    """One line per eval and headline metric shared by the runs, the VQA ceiling's verdict, and where
    stage 2 started (its LM loss, mean of the first 5 logged steps) when the runs logged one."""
    lines = []
    by_eval: dict[str, dict[str, dict]] = defaultdict(dict)
    for run in runs:
        for record in run.records:
            by_eval[record.get("eval") or record["_dir"].name][run.label] = record
    for name, records in by_eval.items():
        for metric in HEADLINE:
            values = {label: r["metrics"][metric] for label, r in records.items() if metric in r["metrics"]}
            if values:
                best = max(values.values())
                leaders = [label for label, v in values.items() if v == best]
                said = " vs ".join(f"{label} {v:.4g}" for label, v in values.items())
                lead = "all equal" if len(leaders) == len(values) > 1 else f"best: {', '.join(leaders)}"
                lines.append(f"{name}, {metric.replace('_', ' ')}: {said} ({lead})")
        for label, record in records.items():
            line = (record.get("ceiling_verdict") or {}).get("line")
            if line:
                lines.append(f"{name} ({label}): {line}")
                break
    starts = {run.label: first_lm_loss(run.path) for run in runs}
    if all(v is not None for v in starts.values()):
        lines.append("LM loss at the start of training (mean of the first 5 logged steps): "
                     + " vs ".join(f"{label} {v:.2f}" for label, v in starts.items()))
    return lines


def first_lm_loss(run: Path, steps: int = 5) -> float | None:
    from blitext.plot import read_records

    file = run / "metrics.jsonl"
    if not file.is_file():
        return None
    lm = [r["lm"] for r in read_records(file) if isinstance(r.get("lm"), (int, float))][:steps]
    return sum(lm) / len(lm) if lm else None


def caption_sections(runs: list[RunEvals], config: ReportConfig) -> tuple[str, str]:
    """The image grid and the per-class accuracy, from the first run's caption eval data."""
    from blitext.data.readers import read_image_set

    evals = [run.caption_eval() for run in runs]
    if not all(evals):
        return "", ""
    data = read_image_set(evals[0]["data"])
    predictions = [{str(p["image_id"]): p["caption"] for p in read_json(e["_dir"] / "predictions.json")}
                   for e in evals]
    records = [r for r in data.records if all(r.id in p for p in predictions)]
    cells = []
    for record in records[:config.images]:
        lines = [f'<div class="human">{html.escape(record.captions[0] if record.captions else "-")}</div>']
        for run, captions in zip(runs, predictions):
            caption = captions[record.id]
            right = is_right(caption, record.captions)
            lines.append(f'<div class="{"right" if right else "wrong"}">{"✓" if right else "✗"} '
                         f'<b>{html.escape(run.label)}</b>: {html.escape(caption)}</div>')
        cells.append(f'<figure>{thumbnail(data.root, record.image, config.thumbnail)}'
                     f'<figcaption>{"".join(lines)}</figcaption></figure>')
    grid = section(f"Test images ({min(len(records), config.images)} of {len(records)}: human caption, "
                   f"then each run's; ✗ wrong)", f'<div class="grid">{"".join(cells)}</div>')
    return grid, class_section(runs, records, predictions)


def is_right(caption: str, references) -> bool:
    """Exact match as `eval caption` counts it: lower case, punctuation dropped, spaces collapsed."""
    return plain_caption(caption) in {plain_caption(r) for r in references}


def thumbnail(root: Path, ref: str, size: int) -> str:
    from blitext.data.images import load_image

    try:
        image = load_image(root, ref).convert("RGB")
    except (BlitextError, OSError):
        return f'<div class="missing">image not found: {html.escape(ref)}</div>'
    image.thumbnail((size, size))
    if max(image.size) < size:  # small images (easy-VQA's 64 px) drawn larger, pixels kept sharp
        scale = size // max(image.size)
        image = image.resize((image.width * scale, image.height * scale), resample=0)
    return f'<img alt="{html.escape(ref)}" src="{png_data(image)}">'


def png_data(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def caption_classes(captions: list[str]) -> dict[str, list[str]] | None:
    """Classes the captions name, as {kind: class per image}, or None. Captions of one template (the same
    word count, each word position taking a few values, as easy-VQA's "a red circle") give a
    class per varying word position ("word 2": red, ...) and the whole caption ("combination")."""
    words = [plain_caption(c).split() for c in captions]
    if not words or len({len(w) for w in words}) != 1:
        return None
    distinct = [len({w[i] for w in words}) for i in range(len(words[0]))]
    if any(n > max(2, len(words) // 2) for n in distinct):  # a free word, not a class
        return None
    kinds = {f"word {i + 1}": [w[i] for w in words] for i, n in enumerate(distinct) if n > 1}
    if len(kinds) > 1:
        kinds["combination"] = [" ".join(w) for w in words]
    return kinds or None


def class_section(runs: list[RunEvals], records, predictions: list[dict]) -> str:
    references = [r.captions[0] for r in records if r.captions]
    if len(references) != len(records):
        return ""
    kinds = caption_classes(references)
    if not kinds:
        return ""
    tables = []
    for kind, classes in kinds.items():
        counts: dict[str, list[int]] = defaultdict(lambda: [0] * (1 + len(runs)))
        for record, cls in zip(records, classes):
            counts[cls][0] += 1
            for i, captions in enumerate(predictions, 1):
                counts[cls][i] += is_right(captions[record.id], record.captions)
        rows = [[cls, n, *(right / n for right in rights)] for cls, (n, *rights) in sorted(counts.items())]
        tables.append(f"<h3>by {html.escape(kind)}</h3>"
                      + table_html([kind, "images", *(run.label for run in runs)], rows))
    return section("Exact match per class (the classes the human captions name)", "".join(tables))


def curves_section(runs: list[RunEvals]) -> str:
    from blitext.plot import plot_runs

    with_metrics = [run for run in runs if (run.path / "metrics.jsonl").is_file()]
    if not with_metrics:
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        out = plot_runs([run.path for run in with_metrics], Path(tmp) / "curves.png",
                        labels=[run.label for run in with_metrics])
        data = base64.b64encode(out.read_bytes()).decode()
    return section("Loss curves", f'<img class="wide" alt="loss curves" src="data:image/png;base64,{data}">')


def read_budget(path: Path) -> tuple[str, dict[str, list[tuple[float, float]]]]:
    """A budget curve, loosely: {"metric": name, "x": name, "runs": {label: points}} or just {label: points},
    where points are {step: value} or [[step, value], ...]. Returns (y label, {label: sorted points})."""
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise BlitextError(f"{path}: expected a JSON object of run -> {{step: value}}; see blitext report --help")
    metric = str(raw.get("metric", "metric"))
    series = raw.get("runs", {k: v for k, v in raw.items() if k not in ("metric", "x")})
    curves = {}
    for label, points in series.items():
        pairs = points.items() if isinstance(points, dict) else points
        try:
            curves[label] = sorted((float(x), float(y)) for x, y in pairs)
        except (TypeError, ValueError):
            raise BlitextError(f"{path}: run {label!r} is not steps -> numbers ({str(points)[:60]}); "
                               f"write {{step: value}} or [[step, value], ...]") from None
    return f"{metric} by {raw.get('x', 'steps')}", curves


def budget_section(runs: list[RunEvals], budget: str | None) -> str:
    parents = {run.path.resolve().parent for run in runs}
    path = Path(budget) if budget else next((p / BUDGET_FILE for p in parents if (p / BUDGET_FILE).is_file()), None)
    if path is None:
        return ""
    title, curves = read_budget(path)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    try:
        for label, points in curves.items():
            ax.plot(*zip(*points), marker="o", label=label)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(frameon=False)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    return section(f"Budget curve ({html.escape(path.name)})",
                   f'<img class="wide" alt="budget curve" src="data:image/png;base64,{data}">')


def section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>\n{body}\n</section>"


def table_html(columns: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; width: 200px; }}
figure img {{ image-rendering: pixelated; }}
.human {{ font-style: italic; }}
.wrong {{ color: #b00; }}
.right {{ color: #060; }}
img.wide {{ max-width: 100%; }}
</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""
