"""`blitext ablate`'s evaluation of each run and its report: the per-seed table, the aggregates over
seeds with their sign tests and verdicts (terminal, ablation.md, ablation.json), the budget curve
and the loss curves beside it."""
from __future__ import annotations

import math
from pathlib import Path

from blitext.atomic import read_json, write_json, write_text
from blitext.console import console, say
from blitext.evaluation.evaluate import EvalConfig, answers_current, captions_current, eval_caption, eval_vqa
from blitext.recipes import budget
from blitext.recipes.ablate_config import AblateConfig, Splits
from blitext.recipes.ablate_seeds import COMPARES, TESTS, aggregate, verdict

CAPTION_COLUMNS = (("exact_match", "exact"), ("Bleu_4", "BLEU-4"), ("CIDEr", "CIDEr"), ("ROUGE_L", "ROUGE-L"), ("METEOR", "METEOR"),
                   ("SPICE", "SPICE"))


# ---------------------------------------------------------------- evaluation

def evaluate_run(stage2: Path, features: Path, splits: Splits, c: AblateConfig) -> tuple[dict, dict]:
    """VQA when the data has questions, captioning on the test or held-out images; reused when done.
    Returns (metrics, eval folders) per task: the folders hold each item's prediction. A metric an
    evaluation calls undefined (BLEU-4 over 3-word captions) is left out of its task's metrics and
    listed with its reason under metrics["undefined"]."""
    metrics, folders, undefined = {}, {}, {}
    beams = f"-beam{c.num_beams}" if c.num_beams else ""  # settings that change scores name the folder
    if splits.vqa and c.vqa_questions > 0:
        questions, answers = splits.vqa
        folders["vqa"] = stage2 / "eval" / f"vqa-{c.vqa_questions}{beams}"
        metrics["vqa"] = _scores(folders["vqa"], lambda d: eval_vqa(EvalConfig(
            adapter=str(stage2), features=str(features), data=str(questions),
            annotations=str(answers) if answers else None, out=str(d), limit=c.vqa_questions,
            num_beams=c.num_beams)), undefined, reusable=lambda d: answers_current(d, num_beams=c.num_beams))
    if c.caption_images > 0:
        name = (f"caption-{splits.captions.stem.removeprefix('captions_')}-{c.caption_images}-"
                f"{c.caption_max_new_tokens}t{beams}{'-no-meteor' if c.meteor == 'off' else ''}")
        folders["caption"] = stage2 / "eval" / name
        metrics["caption"] = _scores(folders["caption"], lambda d: eval_caption(EvalConfig(
            adapter=str(stage2), features=str(features), data=str(splits.captions), out=str(d),
            limit=c.caption_images, prompt="", min_new_tokens=1, max_new_tokens=c.caption_max_new_tokens,
            num_beams=c.num_beams, meteor=c.meteor)), undefined, reusable=captions_current)
    return {**metrics, **({"undefined": undefined} if undefined else {})}, {task: str(f) for task, f in folders.items()}


def _scores(folder: Path, run, undefined: dict[str, str], reusable) -> dict:
    """The evaluation's metrics but those it calls undefined, which go into `undefined` with their reason.
    `run(folder)` evaluates unless `reusable(folder)` says an earlier evaluation there stands."""
    if not reusable(folder):
        run(folder)
    else:
        say(f"  reusing {folder}")
    record = read_json(folder / "metrics.json")
    void = record.get("undefined") or {}
    undefined.update(void)
    return {name: value for name, value in record["metrics"].items() if name not in void}


def budget_curve(run: tuple[Path, Path], features: Path, splits: Splits, c: AblateConfig) -> list[dict]:
    """Greedy exact match and CIDEr of the run's caption split at stage-2 step 0, each snapshot and the end
    (budget.curve; no METEOR: the table has it). Empty when nothing is captioned."""
    if c.caption_images <= 0:
        return []
    return budget.curve(*run, features, splits.captions, c.caption_images, c.caption_max_new_tokens,
                        final_meteor="off")


def score_columns(metrics: dict) -> dict[str, float]:
    """The table's columns: VQA accuracy (and per answer type), BLEU-4, CIDEr, ROUGE-L, METEOR, SPICE."""
    out, vqa, caption = {}, metrics.get("vqa") or {}, metrics.get("caption") or {}
    if "accuracy" in vqa:
        out["VQA acc"] = vqa["accuracy"]
    out.update({f"VQA {t}": v for t, v in sorted((vqa.get("per_answer_type") or {}).items())})
    out.update({name: caption[key] for key, name in CAPTION_COLUMNS if caption.get(key) is not None})
    return out


# ---------------------------------------------------------------- the table

def table_columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r["scores"]))


def _note(result: dict) -> str:
    n = result["counts"]["vqa_questions"]
    vqa = (f"VQA: accuracy x100 over {n} test questions (one standard error is up to "
           f"{100 * math.sqrt(0.25 / n):.1f} points); " if result["vqa"] and n else "VQA: none (no VQA files); ")
    undefined = dict.fromkeys(pair for r in result["rows"] for pair in r["metrics"].get("undefined", {}).items())
    void = "".join(f" {name} not shown: {why}." for name, why in undefined)
    return (vqa + f"captions: {result['caption_source']}, pycocoevalcap scores (x1).{void} "
            f"Extra P-Former text: {'; '.join(result['extra_text'])} ({result['n_extra']} sentences).")


def report(work: Path, result: dict) -> None:
    """The per-seed table, the table over seeds, the sign tests, the budget curve and one verdict line
    per cell: printed, and written to ablation.md and ablation.json."""
    rows, columns = result["rows"], table_columns(result["rows"])
    cells = aggregate(rows, columns)
    by_name = {cell["cell"]: cell for cell in cells}
    result["cells"] = cells
    result["verdicts"] = [verdict(cell, by_name.get(cell["baseline"])) for cell in cells]
    result["budget_plot"] = _budget_plot(work, rows)
    head = ["w1", "w2", "P-Former text", "sentences", "paper table"]
    per_seed = [[f"{r['w1']:g}", f"{r['w2']:g}", r["pformer_text"], str(r["pformer_sentences"] or "-"),
                 r["paper_table"] or "-", str(r["seed"]), *(_fmt(r["scores"].get(k)) for k in columns)] for r in rows]
    over = [[f"{x['w1']:g}", f"{x['w2']:g}", x["pformer_text"], str(len(x["seeds"])),
             *(_mean_std(x, k) for k in columns)] for x in cells]
    over_head = ["w1", "w2", "P-Former text", "seeds", *columns]
    result["vqa_floor"] = vqa_floor(rows)
    console.print(_terminal_table(result, cells))
    write_json(work / "ablation.json", result)
    write_text(work / "ablation.md", _markdown(result, head + ["seed", *columns], per_seed, over_head, over, cells))
    say(f"  table: {work / 'ablation.md'}, {work / 'ablation.json'}; budget curve: {work / result['budget_plot']}"
        if result["budget_plot"] else f"  table: {work / 'ablation.md'}, {work / 'ablation.json'}")
    for line in result["verdicts"]:
        say(f"[bold]verdict[/] {line}")
    if result["vqa_floor"]:
        say(f"[bold]verdict[/] VQA cannot show anything here: {result['vqa_floor']}")


TERMINAL_COLUMNS = {"exact": 2, "CIDEr": 2, "VQA acc": 1}  # with their digits; every column is in ablation.md


def _terminal_table(result: dict, cells: list[dict]):
    """The table over seeds with the columns a verdict rests on, sized to stay whole at 80 columns
    (every column of every seed is in ablation.md)."""
    from rich.table import Table

    columns = {k: d for k, d in TERMINAL_COLUMNS.items() if any(k in x["mean"] for x in cells)}
    table = Table("w1", "w2", "P-Former text", *columns, f"to {budget.GOAL:.2f}",
                  title=f"ablation on {result['data']}: mean±std over seeds {result['seeds']}",
                  caption=f"to {budget.GOAL:.2f}: stage-2 steps to {budget.GOAL:.2f} exact per seed (- never); "
                          "all columns: ablation.md")
    for x in cells:
        steps = x["budget"]["steps_to_goal"] if x["budget"] else []
        table.add_row(f"{x['w1']:g}", f"{x['w2']:g}", x["pformer_text"],
                      *(_mean_std(x, k, d, "±") for k, d in columns.items()),
                      ",".join("-" if s is None else str(s) for s in steps) or "-")
    return table


def vqa_floor(rows: list[dict]) -> str | None:
    """The VQA evaluation's own finding that the LLM cannot answer even from the caption as text
    (eval vqa's ceiling_verdict), from the first run that has it; None when VQA can show something."""
    for r in rows:
        folder = (r.get("eval") or {}).get("vqa")
        record = Path(folder) / "metrics.json" if folder else None
        if record and record.is_file():
            found = read_json(record).get("ceiling_verdict") or {}
            if found.get("near_floor"):
                return found["line"]
    return None


def _markdown(result: dict, head: list[str], per_seed: list[list[str]], over_head: list[str],
              over: list[list[str]], cells: list[dict]) -> str:
    tests = [[x["cell"], items, str(t["items"]), str(t["wins"]), str(t["losses"]), str(t["ties"]),
              f"{t['sign_test_p']:.3g}", str(len(t["seeds"]))]
             for x in cells for task, _, items in TESTS if (t := x["versus_baseline"].get(task))]
    reach = [[x["cell"], ", ".join("never" if s is None else str(s) for s in x["budget"]["steps_to_goal"]),
              f"{x['budget']['median_steps_to_goal']:g}" if any(s is not None for s in x["budget"]["steps_to_goal"])
              else "never"] for x in cells if x["budget"]]
    parts = [f"# Ablation on {result['data']}", f"Rows: Table 4's (w1, w2) cells and Table 6's P-Former text sizes, "
             f"at seeds {', '.join(map(str, result['seeds']))}. {_note(result)}",
             "## Each seed", _md_table(head, per_seed),
             "## Over seeds (mean ± sample std)", _md_table(over_head, over)]
    if tests:
        parts += ["## Against (0, 0), item by item", COMPARES,
                  _md_table(["cell", "compared on", "n", "better", "worse", "ties", "sign test p", "seeds"], tests)]
    if reach:
        parts += ["## Budget curve", f"Greedy captions of the caption split at stage-2 step 0 (the stage-1 "
                  f"adaptor; 0 when w1 = 0: its llm_proj never met the LLM), each snapshot and the end. Stage-2 "
                  f"steps to {budget.GOAL:.2f} exact (a seed that never reaches it counts as past the last step "
                  f"in the median):", _md_table(["cell", "per seed", "median"], reach),
                  f"![budget curve]({result['budget_plot']})"]
    floor = [f"VQA cannot show anything here: {result['vqa_floor']}"] if result.get("vqa_floor") else []
    parts += ["## Verdicts", "\n".join(f"- {line}" for line in result["verdicts"] + floor),
              "Loss curves: " + ", ".join(f"[seed {s}](seed-{s}/stage2-curves.png)" for s in result["seeds"])]
    return "\n\n".join(parts) + "\n"


def _md_table(head: list[str], lines: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(line) + " |" for line in lines)])


def _budget_plot(work: Path, rows: list[dict]) -> str | None:
    """budget-curve.png: exact match and CIDEr against stage-2 steps, one line per (cell, seed)."""
    curves = {}
    for r in rows:
        if r.get("curve"):
            curves.setdefault(r["cell"], []).append(r["curve"])
    if not curves:
        return None
    return budget.plot_curves(curves, work / "budget-curve.png", {cell: cell for cell in curves}).name


def _mean_std(cell: dict, column: str, digits: int = 4, sep: str = " ± ") -> str:
    if column not in cell["mean"]:
        return "-"
    std = cell["std"][column]
    return f"{cell['mean'][column]:.{digits}f}" + ("" if std is None else f"{sep}{std:.{digits}f}")


def plot_curves(work: Path, rows: list[dict]) -> None:
    """Loss curves: every distinct stage-1 run, then every stage-2 run (PNG beside the table)."""
    from blitext.plot import plot_runs

    stage1 = list(dict.fromkeys(Path(r["stage1"]) for r in rows))
    plot_runs(stage1, work / "stage1-curves.png", labels=[p.name for p in stage1])
    png = plot_runs([Path(r["stage2"]) for r in rows], work / "stage2-curves.png",
                    labels=[f"w1={r['w1']:g} w2={r['w2']:g} {r['pformer_text']}" for r in rows])
    say(f"  loss curves: {work / 'stage1-curves.png'}, {png}")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
