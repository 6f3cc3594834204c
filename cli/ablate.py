"""`blitext ablate`: a thin typer command over blitext.recipes.ablate.run_ablation.

cli/main.py registers it (`app.command("ablate")(ablate_cmd)`); the help shows AblateConfig's defaults.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from blitext.cli.common import default_is, default_of, user_errors
from blitext.recipes.ablate_config import AblateConfig
from blitext.recipes.recipe import Recipe


@user_errors
def ablate_cmd(
    data: Optional[str] = typer.Option(None, "--data", help="easy-vqa | tuxpaint | fashion-mnist, a folder with captions_train.json or captions.json (+ captions_test.json, vqa_test_*.json), or a caption JSON. " + default_of(AblateConfig, "data")),
    features: Optional[Path] = typer.Option(None, "--features", help="Existing feature cache of the data's images. " + default_is("extract into <cache>/features/")),
    grid: Optional[str] = typer.Option(None, "--grid", help='(w1, w2) cells, e.g. "0,0;10,100". '
                                + default_of(AblateConfig, "grid", fmt=lambda grid: '"' + ";".join(f"{w1:g},{w2:g}" for w1, w2 in grid) + '" (Table 4)')),
    text_sizes: Optional[bool] = typer.Option(None, "--text-sizes/--no-text-sizes", help="Table 6: a P-Former on the paired captions only against paired + extra text, each with a (10, 100) adaptor. " + default_of(AblateConfig, "text_sizes")),
    extra_sizes: Optional[str] = typer.Option(None, "--extra-sizes", help='Table 6 with these extra-sentence counts, e.g. "0,500" (0 = paired only). ' + default_is("0 and all")),
    extra_text: Optional[list[Path]] = typer.Option(None, "--extra-text", help="Extra sentence file for the P-Former (text, .jsonl, caption .json); repeat for several. " + default_is("compositional captions + WordNet examples when wordnet-base is installed")),
    limit: Optional[int] = typer.Option(None, "--limit", help="Images per split when preparing a named data set (tuxpaint: in all). " + default_of(AblateConfig, "images_per_split")),
    heldout_images: Optional[int] = typer.Option(None, "--heldout-images", help="Without captions_test.json: train images kept out for captioning. " + default_of(AblateConfig, "heldout_images")),
    pformer_steps: Optional[int] = typer.Option(None, "--pformer-steps", help="P-Former steps per text variant. " + default_of(Recipe, "pformer_steps")),
    stage1_steps: Optional[int] = typer.Option(None, "--stage1-steps", help="Stage-1 steps (ITC + ITM + ITG + w1 L_align). " + default_of(Recipe, "stage1_steps")),
    stage2_steps: Optional[int] = typer.Option(None, "--stage2-steps", help="Stage-2 steps (LM + w2 L_align). " + default_of(Recipe, "stage2_steps")),
    n_prompt: Optional[int] = typer.Option(None, "--n-prompt", help="Soft prompts = Q-Former queries. " + default_of(Recipe, "n_prompt")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Both stages' batch. " + default_of(Recipe, "batch_size")),
    stage1_lr: Optional[float] = typer.Option(None, "--stage1-lr", help="Stage-1 learning rate. " + default_of(Recipe, "stage1_lr")),
    stage2_lr: Optional[float] = typer.Option(None, "--stage2-lr", help="Stage-2 learning rate. " + default_of(Recipe, "stage2_lr")),
    vqa_questions: Optional[int] = typer.Option(None, "--vqa-questions", help="Test questions per run (0: no VQA). " + default_of(AblateConfig, "vqa_questions")),
    caption_images: Optional[int] = typer.Option(None, "--caption-images", help="Images captioned per run (0: none). " + default_of(AblateConfig, "caption_images")),
    seeds: Optional[list[int]] = typer.Option(None, "--seeds", "--seed", help="Train every cell once per seed and report mean ± std, sign tests against (0, 0) and budget curves over them (repeat: --seeds 42 --seeds 1 --seeds 2). " + default_of(AblateConfig, "seeds", fmt=lambda seeds: " ".join(map(str, seeds)))),
    scale: Optional[float] = typer.Option(None, "--scale", help="Multiply every step count and evaluation size. " + default_of(AblateConfig, "scale")),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder. " + default_is("<cache>/runs/ablate/<data>-<sizes>-<hash>")),
    smoke: bool = typer.Option(False, "--smoke", help="Every phase with a handful of steps (a check that all runs, in minutes)."),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON or TOML file of AblateConfig values (command-line options win)."),
):
    """Table 4 (alignment weights w1, w2) and Table 6 (P-Former text size) of the paper on any data set."""
    from blitext.recipes.ablate import run_ablation
    from blitext.recipes.ablate_config import SMOKE
    from blitext.config import read_config_file, resolve_config
    from blitext.errors import BlitextError

    if text_sizes is False and extra_sizes:
        raise BlitextError("--no-text-sizes and --extra-sizes contradict each other: pass one of them")
    sizes = _counts(extra_sizes) if extra_sizes else text_sizes
    options = dict(data=data, features=features and str(features), grid=grid, text_sizes=sizes,
                   extra_text=[str(p) for p in extra_text] if extra_text else None, images_per_split=limit,
                   heldout_images=heldout_images,
                   vqa_questions=vqa_questions, caption_images=caption_images, seeds=seeds, scale=scale,
                   out=out and str(out))
    recipe = dict(pformer_steps=pformer_steps, stage1_steps=stage1_steps, stage2_steps=stage2_steps, n_prompt=n_prompt, batch_size=batch_size,
                  stage1_lr=stage1_lr, stage2_lr=stage2_lr)
    resolved = resolve_config(AblateConfig, config, **options)  # checks keys and types
    given = {*(read_config_file(config) if config else {}), *(k for k, v in options.items() if v is not None)}
    base = SMOKE if smoke else AblateConfig()
    chosen = dataclasses.replace(base, **{k: getattr(resolved, k) for k in given})
    run_ablation(dataclasses.replace(chosen, recipe=dataclasses.replace(
        chosen.recipe, **{k: v for k, v in recipe.items() if v is not None})))


def _counts(text: str) -> list[int]:
    from blitext.errors import BlitextError

    try:
        return [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise BlitextError(f"--extra-sizes {text!r}: write whole numbers of sentences, e.g. '0,500'") from None
