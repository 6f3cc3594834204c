"""`blitext ablate` over seeds: each cell's mean and spread of every score, its paired sign test
against the (0, 0) cell at the same seed (per caption image and per VQA question, pooled over
seeds), its budget curve's steps to 0.85 exact, and one verdict line per cell.

The per-item hits come from the evaluations already on disk (predictions.json beside metrics.json,
which names the data scored): nothing is generated again.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from blitext.atomic import read_json
from blitext.errors import BlitextError
from blitext.metrics.stats import paired_counts
from blitext.recipes import budget

BASELINE = (0.0, 0.0)  # BLIP-2: no P-Former, no L_align; every other cell is tested against it
TESTS = (("caption", "exact", "images"), ("vqa", "VQA acc", "questions"))  # (eval, score column, items)
COMPARES = ("Sign test: for every caption image (VQA question) and seed, the cell and (0, 0) at the same "
            "seed, trained on the same data, are compared on whether each is right (the exact caption; the "
            "answer with full VQA credit); items where exactly one is right count as a win or a loss, ties "
            "(both or neither right) are dropped; p is the two-sided exact binomial test of wins against "
            "losses at even odds, pooled over seeds.")


# ---------------------------------------------------------------- per-item hits

def item_hits(folder: Path) -> dict[str, bool]:
    """Per item of one `eval caption` / `eval vqa` folder: right or not, from its predictions.json and the
    data its metrics.json names. Captions: the exact caption (caption_exact_match's rule); VQA: full credit
    (one answer: exact match; ten human answers: accuracy 1, i.e. at least 4 humans gave it). Questions
    without answers (no annotations) give no hits."""
    record = read_json(Path(folder) / "metrics.json")
    config, predictions = record["provenance"]["config"], read_json(Path(folder) / "predictions.json")
    if record["task"] == "caption":
        return _caption_hits(config, predictions)
    if record["task"] == "vqa":
        return _vqa_hits(config, predictions, record.get("answer_normalisation"))
    raise BlitextError(f"{folder} holds a {record['task']} evaluation: item hits exist for caption and vqa only")


def _caption_hits(config: dict, predictions: list[dict]) -> dict[str, bool]:
    from blitext.evaluation.score import caption_references
    from blitext.metrics import caption_exact_hits

    refs = caption_references(config["data"], config["limit"])
    hyps = {str(p["image_id"]): p["caption"] for p in predictions}  # coco_id wrote plain-integer ids as ints
    return caption_exact_hits({i: refs[i] for i in hyps}, hyps)


def _vqa_hits(config: dict, predictions: list[dict], normalise: str | None) -> dict[str, bool]:
    from blitext.evaluation.score import vqa_records
    from blitext.metrics import exact_match, vqa_accuracy
    from blitext.metrics.vqa import DEFAULT_NORMALISATION

    normalise = normalise or DEFAULT_NORMALISATION
    answers = {str(p["question_id"]): p["answer"] for p in predictions}
    hits = {}
    for r in vqa_records(config["data"], config.get("annotations"), config["limit"]):
        if not r.answers or str(r.question_id) not in answers:
            continue
        answer = answers[str(r.question_id)]
        score = (exact_match(answer, r.answers[0], normalise) if len(r.answers) == 1
                 else vqa_accuracy(answer, r.answers, normalise))
        hits[str(r.question_id)] = score >= 1 - 1e-9
    return hits


def pooled_test(rows: list[dict], cell: str, base: str, task: str) -> dict | None:
    """`cell` against `base` on every item of `task` at every seed both ran: paired_counts over
    (seed, item) pairs. None when either has no evaluation of that task."""
    hits = {}
    for r in rows:
        folder = (r.get("eval") or {}).get(task)
        if folder and r["cell"] in (cell, base):
            hits.setdefault(r["cell"], {}).update({f"{r['seed']}/{k}": v for k, v in item_hits(folder).items()})
    if cell not in hits or base not in hits:
        return None
    seeds = sorted({r["seed"] for r in rows if r["cell"] == cell} & {r["seed"] for r in rows if r["cell"] == base})
    return {**paired_counts(hits[cell], hits[base]), "seeds": seeds}


# ---------------------------------------------------------------- aggregates

def cell_label(w1: float, w2: float, text: str) -> str:
    """'(0,0)' for BLIP-2; '(10,100) paired+1200' for a cell whose P-Former read paired + 1,200 sentences."""
    return f"({w1:g},{w2:g})" + ("" if (w1, w2) == BASELINE and text.startswith("none") else f" {text}")


def aggregate(rows: list[dict], columns: list[str]) -> list[dict]:
    """Per cell, in the rows' order: mean and sample std (None from one seed) of each score over seeds,
    steps to budget.GOAL exact per seed and their median, and the paired tests against (0, 0)."""
    order = list(dict.fromkeys(r["cell"] for r in rows))
    base = next((r["cell"] for r in rows if (r["w1"], r["w2"]) == BASELINE), None)
    curves = {cell: [r["curve"] for r in rows if r["cell"] == cell and r.get("curve")] for cell in order}
    steps = budget.summary({cell: runs for cell, runs in curves.items() if runs})
    out = []
    for cell in order:
        mine = [r for r in rows if r["cell"] == cell]
        values = {k: [r["scores"][k] for r in mine if r["scores"].get(k) is not None] for k in columns}
        first = mine[0]
        out.append({"cell": cell, "w1": first["w1"], "w2": first["w2"], "pformer_text": first["pformer_text"],
                    "paper_table": first["paper_table"], "seeds": [r["seed"] for r in mine],
                    "mean": {k: statistics.mean(v) for k, v in values.items() if v},
                    "std": {k: statistics.stdev(v) if len(v) > 1 else None for k, v in values.items() if v},
                    "budget": steps.get(cell), "baseline": base if cell != base else None,
                    "versus_baseline": {} if base in (None, cell) else
                    {task: t for task, *_ in TESTS if (t := pooled_test(rows, cell, base, task))}})
    return out


# ---------------------------------------------------------------- verdicts

def verdict(cell: dict, base: dict | None) -> str:
    """One line: the cell's scores against (0, 0)'s, the sign tests, and where each reaches 0.85 exact.
    A score at its floor (0 in both) or a test with no item where exactly one is right says so."""
    if base is None:
        parts = [_alone(cell, column) for _, column, _ in TESTS if column in cell["mean"]]
        reach = _reach(cell["budget"])
        goal = [] if not reach else [f"never reaches {budget.GOAL:.2f} exact" if reach == "never"
                                     else f"reaches {budget.GOAL:.2f} exact at stage-2 {reach}"]
        return f"{cell['cell']}: " + "; ".join(parts + goal) + " (the other cells are tested against it)"
    parts = [_compared(cell, base, task, column, items) for task, column, items in TESTS if column in cell["mean"]]
    reach, base_reach = _reach(cell["budget"]), _reach(base["budget"])
    if reach == base_reach == "never":
        parts.append(f"neither reaches {budget.GOAL:.2f} exact")
    elif reach and base_reach:
        parts.append(f"reaches {budget.GOAL:.2f} exact at stage-2 {reach} vs {base_reach}")
    return f"{cell['cell']} vs {base['cell']}: " + "; ".join(parts)


def _compared(cell: dict, base: dict, task: str, column: str, items: str) -> str:
    mine, theirs = cell["mean"][column], base["mean"].get(column)
    if theirs is None:
        return f"{column} {_pm(cell, column)} (no {column} for {base['cell']})"
    if mine == 0 and theirs == 0:
        return f"{column} 0 in both (at its floor: no comparison)"
    line = f"{column} {_pm(cell, column)} vs {_pm(base, column)}"
    t = cell["versus_baseline"].get(task)
    if t is None:
        return line + " (no per-item test)"
    seeds = f"{len(t['seeds'])} seed{'s' * (len(t['seeds']) > 1)}"
    if t["wins"] + t["losses"] == 0:
        return line + f"; right on exactly the same {t['items']} {items} ({seeds}): no test"
    return line + (f"; better on {t['wins']} {items}, worse on {t['losses']} ({t['ties']} ties), "
                   f"sign test p={t['sign_test_p']:.2g} ({seeds})")


def _alone(cell: dict, column: str) -> str:
    return f"{column} {_pm(cell, column)}" + (" (at its floor)" if cell["mean"][column] == 0 else "")


def _pm(cell: dict, column: str) -> str:
    """'0.97±0.02' (mean ± sample std over seeds); the mean alone from one seed. VQA in points."""
    digits = 1 if column.startswith("VQA") else 2
    mean, std = cell["mean"][column], cell["std"].get(column)
    return f"{mean:.{digits}f}" + ("" if std is None else f"±{std:.{digits}f}")


def _reach(steps: dict | None) -> str | None:
    """'step 10', 'step 25 (median of 10, 25, never)' or 'never' (in the steps its curve ran)."""
    if steps is None:
        return None
    per_seed = steps["steps_to_goal"]
    if not any(s is not None for s in per_seed):
        return "never"
    if len(per_seed) == 1:
        return f"step {per_seed[0]}"
    return f"step {steps['median_steps_to_goal']:g} (median of " + \
        ", ".join("never" if s is None else str(s) for s in per_seed) + ")"
