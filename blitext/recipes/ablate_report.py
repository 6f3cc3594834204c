"""`blitext ablate`'s evaluation of each run and its report: the table (terminal, ablation.md,
ablation.json) and the loss curves beside it."""
from __future__ import annotations

import math
from pathlib import Path

from blitext.atomic import read_json, write_json, write_text
from blitext.console import console, say
from blitext.evaluation.evaluate import EvalConfig, eval_caption, eval_vqa
from blitext.recipes.ablate_config import AblateConfig, Splits

CAPTION_COLUMNS = (("Bleu_4", "BLEU-4"), ("CIDEr", "CIDEr"), ("ROUGE_L", "ROUGE-L"), ("METEOR", "METEOR"),
                   ("SPICE", "SPICE"))


# ---------------------------------------------------------------- evaluation

def evaluate_run(stage2: Path, features: Path, splits: Splits, c: AblateConfig) -> dict:
    """VQA when the data has questions, captioning on the test or held-out images; reused when done."""
    out, beams = {}, f"-beam{c.num_beams}" if c.num_beams else ""  # settings that change scores name the folder
    if splits.vqa and c.vqa_questions > 0:
        questions, answers = splits.vqa
        out["vqa"] = _scores(stage2 / "eval" / f"vqa-{c.vqa_questions}{beams}", lambda d: eval_vqa(EvalConfig(
            adapter=str(stage2), features=str(features), data=str(questions),
            annotations=str(answers) if answers else None, out=str(d), limit=c.vqa_questions,
            num_beams=c.num_beams)))
    if c.caption_images > 0:
        name = (f"caption-{splits.captions.stem.removeprefix('captions_')}-{c.caption_images}-"
                f"{c.caption_max_new_tokens}t{beams}{'-no-meteor' if c.meteor == 'off' else ''}")
        out["caption"] = _scores(stage2 / "eval" / name, lambda d: eval_caption(EvalConfig(
            adapter=str(stage2), features=str(features), data=str(splits.captions), out=str(d),
            limit=c.caption_images, prompt="", min_new_tokens=1, max_new_tokens=c.caption_max_new_tokens,
            num_beams=c.num_beams, meteor=c.meteor)))
    return out


def _scores(folder: Path, run) -> dict:
    if not (folder / "metrics.json").is_file():
        run(folder)
    else:
        say(f"  reusing {folder}")
    return read_json(folder / "metrics.json")["metrics"]


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
    return (vqa + f"captions: {result['caption_source']}, pycocoevalcap scores (x1). "
            f"Extra P-Former text: {'; '.join(result['extra_text'])} ({result['n_extra']} sentences).")


def report(work: Path, result: dict) -> None:
    from rich.table import Table

    columns = table_columns(result["rows"])
    head = ["w1", "w2", "P-Former text", "sentences", "paper table"]
    table = Table(*head, *columns, title=f"ablation on {result['data']}", caption=_note(result))
    lines = ["| " + " | ".join(head + columns) + " |", "|" + "---|" * (len(head) + len(columns))]
    for r in result["rows"]:
        cells = [f"{r['w1']:g}", f"{r['w2']:g}", r["pformer_text"], str(r["pformer_sentences"] or "-"),
                 r["paper_table"] or "-", *(_fmt(r["scores"].get(k)) for k in columns)]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    write_json(work / "ablation.json", result)
    write_text(work / "ablation.md", f"# Ablation on {result['data']}\n\nRows: Table 4's (w1, w2) cells and "
                f"Table 6's P-Former text sizes. {_note(result)}\n\n" + "\n".join(lines) + "\n")
    say(f"  table: {work / 'ablation.md'}, {work / 'ablation.json'}")


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
