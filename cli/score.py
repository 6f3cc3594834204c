"""`blitext score caption|vqa`: thin typer commands over blitext.evaluation.score.

cli/main.py imports this module (`app.add_typer(score_app, name="score")`); the shared handler and
options are in cli/common.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from blitext.cli.common import VQA_NORMALISE_HELP, ConfigOpt, call_with_config, default_is, default_of, user_errors
from blitext.evaluation.score import ScoreConfig

score_app = typer.Typer(no_args_is_help=True,
                        help="Score any system's predictions (COCO caption or VQA results JSON) with eval's metrics.")


def _default(name: str) -> str:
    return default_of(ScoreConfig, name)


OutOpt = typer.Option(None, "--out", help=f"Folder for metrics.json. {default_is('score-<task>-<data name> beside the predictions')}")
LimitOpt = typer.Option(None, "--limit", help="Only the first N images (questions) of --data, as eval --limit N.")
# caption metrics' options, shared with eval caption (whose defaults are ScoreConfig's)
TokenizerOpt = typer.Option(None, "--tokenizer", help=f"PTB tokenizer: auto | java | python. {_default('tokenizer')}")
MeteorOpt = typer.Option(None, "--meteor", help=f"auto | java | off (Java). {_default('meteor')}")
SpiceOpt = typer.Option(None, "--spice", help=f"auto | java | off (Java + Stanford models). {_default('spice')}")


def _run(task: str, config: Optional[Path], **options) -> None:
    from blitext.evaluation import score

    call_with_config(getattr(score, f"score_{task}"), ScoreConfig, config, options)


@score_app.command("caption")
@user_errors
def caption_cmd(
    predictions: Optional[Path] = typer.Option(None, "--predictions", help='COCO caption results JSON: [{"image_id": ..., "caption": "..."}, ...], one per image.'),
    data: Optional[str] = typer.Option(None, "--data", help="Caption JSON (LAVIS / COCO) or folder: the images and their reference captions (as eval caption)."),
    out: Optional[Path] = OutOpt,
    limit: Optional[int] = LimitOpt,
    tokenizer: Optional[str] = TokenizerOpt,
    meteor: Optional[str] = MeteorOpt,
    spice: Optional[str] = SpiceOpt,
    config: Optional[Path] = ConfigOpt,
):
    """COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr, SPICE, exact match) of any system's captions."""
    _run("caption", config, predictions=predictions, data=data, out=out, limit=limit, tokenizer=tokenizer,
         meteor=meteor, spice=spice)


@score_app.command("vqa")
@user_errors
def vqa_cmd(
    predictions: Optional[Path] = typer.Option(None, "--predictions", help='VQA results JSON: [{"question_id": ..., "answer": "..."}, ...], one per question.'),
    data: Optional[str] = typer.Option(None, "--data", "--questions", help="VQAv2 / OK-VQA questions JSON, or a GQA questions JSON (answers inline)."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="VQAv2 / OK-VQA annotations JSON (the human answers)."),
    out: Optional[Path] = OutOpt,
    limit: Optional[int] = LimitOpt,
    vqa_normalise: Optional[str] = typer.Option(None, "--vqa-normalise", help=VQA_NORMALISE_HELP + " " + _default('vqa_normalise')),
    config: Optional[Path] = ConfigOpt,
):
    """VQAv2 / OK-VQA accuracy (per answer type) or GQA exact match of any system's answers, beside the
    majority-answer base rate."""
    _run("vqa", config, predictions=predictions, data=data, annotations=annotations, out=out, limit=limit,
         vqa_normalise=vqa_normalise)
