"""`blitext eval caption|vqa|retrieval` and `blitext compare`: thin typer commands over blitext.evaluation.evaluate.

cli/main.py imports this module (`app.add_typer(eval_app, name="eval")`,
`app.command("compare")(compare_cmd)`); the shared handler and options are in cli/common.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from blitext.cli.common import (VQA_NORMALISE_HELP, BeamsOpt, BlankOpt, ConfigOpt, LLMOpt, MaxOpt, MinOpt, PenaltyOpt,
                                 PromptOpt, call_with_config, default_is, default_of, user_errors)
from blitext.cli.score import MeteorOpt, SpiceOpt, TokenizerOpt
from blitext.evaluation.evaluate import EvalConfig

eval_app = typer.Typer(no_args_is_help=True,
                       help="Score an adaptor from a feature cache: captioning, zero-shot VQA, image-text retrieval.")


def _default(name: str) -> str:
    return default_of(EvalConfig, name)


AdapterOpt = typer.Option(None, "--adapter", help="train-adapter run folder, <run>/final or a checkpoint.")
FeaturesOpt = typer.Option(None, "--features", help="Feature cache of the evaluation images (extract-features with the adaptor's encoder).")
OutOpt = typer.Option(None, "--out", help=f"Output folder. {default_is('<run>/eval/<task>-<data name>')}")
LimitOpt = typer.Option(None, "--limit", help="Only the first N images (questions for vqa).")
BatchOpt = typer.Option(None, "--batch-size", help=f"Images (questions) per generate call. {_default('batch_size')}")
DeviceOpt = typer.Option(None, "--device", help=f"auto | cpu | cuda | cuda:N. {_default('device')}")
SkipMissingOpt = typer.Option(None, "--skip-missing", help="Score the images the feature cache holds and print how "
                              "many had no features, instead of refusing the data file.")


def _run(task: str, config: Optional[Path], **options) -> None:
    from blitext.evaluation import evaluate

    call_with_config(getattr(evaluate, f"eval_{task}"), EvalConfig, config, options)


@eval_app.command("caption")
@user_errors
def caption_cmd(
    adapter: Optional[Path] = AdapterOpt,
    features: Optional[Path] = FeaturesOpt,
    data: Optional[str] = typer.Option(None, "--data", help="Caption JSON (LAVIS / COCO) or folder: the images and their reference captions."),
    out: Optional[Path] = OutOpt,
    limit: Optional[int] = LimitOpt,
    batch_size: Optional[int] = BatchOpt,
    device: Optional[str] = DeviceOpt,
    llm: Optional[str] = LLMOpt,
    settings: Optional[str] = typer.Option(None, "--settings", help="run (the text prompt, none, and caption length the adaptor trained with; older runs: paper) | paper (\"a photo of\", beam 5, 8..30 tokens). " + _default("settings")),
    prompt: Optional[str] = PromptOpt,
    num_beams: Optional[int] = BeamsOpt,
    max_new_tokens: Optional[int] = MaxOpt,
    min_new_tokens: Optional[int] = MinOpt,
    length_penalty: Optional[float] = PenaltyOpt,
    blank_start: Optional[bool] = BlankOpt,
    tokenizer: Optional[str] = TokenizerOpt,
    meteor: Optional[str] = MeteorOpt,
    spice: Optional[str] = SpiceOpt,
    skip_missing: Optional[bool] = SkipMissingOpt,
    config: Optional[Path] = ConfigOpt,
):
    """COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr, SPICE) of a stage-2 adaptor's captions."""
    _run("caption", config, adapter=adapter, features=features, data=data, out=out, limit=limit,
         batch_size=batch_size, device=device, llm=llm, settings=settings, prompt=prompt, num_beams=num_beams,
         max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, length_penalty=length_penalty,
         blank_start=blank_start,
         tokenizer=tokenizer, meteor=meteor, spice=spice, skip_missing=skip_missing)


@eval_app.command("vqa")
@user_errors
def vqa_cmd(
    adapter: Optional[Path] = AdapterOpt,
    features: Optional[Path] = FeaturesOpt,
    data: Optional[str] = typer.Option(None, "--data", "--questions", help="VQAv2 / OK-VQA questions JSON, or a GQA questions JSON (answers inline)."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="VQAv2 / OK-VQA annotations JSON; without it only predictions.json is written."),
    out: Optional[Path] = OutOpt,
    limit: Optional[int] = LimitOpt,
    batch_size: Optional[int] = BatchOpt,
    device: Optional[str] = DeviceOpt,
    llm: Optional[str] = LLMOpt,
    prompt: Optional[str] = PromptOpt,
    num_beams: Optional[int] = BeamsOpt,
    max_new_tokens: Optional[int] = MaxOpt,
    min_new_tokens: Optional[int] = MinOpt,
    length_penalty: Optional[float] = PenaltyOpt,
    blank_start: Optional[bool] = BlankOpt,
    vqa_normalise: Optional[str] = typer.Option(None, "--vqa-normalise", help=VQA_NORMALISE_HELP + " " + _default('vqa_normalise')),
    captions: Optional[Path] = typer.Option(None, "--captions", help="Caption JSON (LAVIS / COCO) of the questions' images, for the text ceiling: the same LLM, prompt and decoding given each image's first caption as text instead of the adaptor's prompts. " + default_is("captions_<split>.json beside the questions file, e.g. vqa_test_questions.json -> captions_test.json; none there: the ceiling is reported unavailable")),
    skip_missing: Optional[bool] = SkipMissingOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Zero-shot VQA accuracy (VQAv2 / OK-VQA, per answer type) or GQA exact match of a stage-2 adaptor,
    beside the text ceiling (the caption as text) and the majority-answer base rate."""
    _run("vqa", config, adapter=adapter, features=features, data=data, annotations=annotations, out=out,
         limit=limit, batch_size=batch_size, device=device, llm=llm, prompt=prompt, num_beams=num_beams,
         max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, length_penalty=length_penalty,
         blank_start=blank_start,
         vqa_normalise=vqa_normalise, captions=captions, skip_missing=skip_missing)


@eval_app.command("retrieval")
@user_errors
def retrieval_cmd(
    adapter: Optional[Path] = AdapterOpt,
    features: Optional[Path] = FeaturesOpt,
    data: Optional[str] = typer.Option(None, "--data", help="Caption JSON (LAVIS / COCO) or folder: the images and their captions."),
    out: Optional[Path] = OutOpt,
    limit: Optional[int] = LimitOpt,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=f"Images (texts) per ITC forward. {_default('batch_size')}"),
    device: Optional[str] = DeviceOpt,
    k: Optional[int] = typer.Option(None, "--k", help=f"Candidates per query re-scored with ITM. {_default('k')}"),
    skip_missing: Optional[bool] = SkipMissingOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Image<->text R@1/5/10: ITC for all pairs, ITM + ITC on each query's top k (BLIP-2); any stage."""
    _run("retrieval", config, adapter=adapter, features=features, data=data, out=out, limit=limit,
         batch_size=batch_size, device=device, k=k, skip_missing=skip_missing)


@user_errors
def compare_cmd(runs: list[Path] = typer.Argument(..., help="metrics.json files, eval folders or run folders (eval/*/metrics.json).")):
    """Every numeric metric of several evaluations side by side."""
    from blitext.evaluation.compare import compare_runs, print_compare

    print_compare(*compare_runs(runs))
