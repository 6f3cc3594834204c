"""`blitext demo --video`: the video variant end to end (the paper's Table 7 in miniature).

On the generated moving-shapes clips ("a red circle moves left") and the bundled models: prepare
the clips, cache per-segment features with the image encoder on sampled frames (no I3D weights
ship offline), train the P-Former on the train captions, cache the reference prompts, then
train the video Transformer adaptor twice with the same seed and LM steps - the "ITG only"
baseline (LM loss alone) and the paper's schedule (L_align x 100 alone first, then LM alone) -
caption the test clips with both, and print the side-by-side table and a few examples. Every
finished phase is reused when run again; an interrupted one resumes.

Sized for a 2-core CPU (a few minutes); `--scale` multiplies the steps and evaluation size,
`--smoke` runs every phase with a handful of steps (tests, CI).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from blitext.config import default_cache_root
from blitext.console import console, say
from blitext.data.prepare import prepare_dataset
from blitext.recipes.demo import print_prompt_check, settings_digest
from blitext.recipes.recipe import Recipe, pformer_config, pformer_tag, train_once
from blitext.evaluation.compare import compare_runs, print_compare
from blitext.evaluation.evaluate import EvalConfig, captions_current, eval_caption
from blitext.features.video import VideoExtractConfig, extract_video_features
from blitext.pformer.train import train_pformer
from blitext.pformer.prompts import BuildPromptsConfig, build_prompts
from blitext.adapter.video import VideoAdapterConfig, train_video_adapter

VARIANTS = {"itg-only": 0.0, "pformer": 100.0}  # w_align: Table 7's two rows


@dataclass
class VideoDemoConfig:
    clips_per_split: int | None = 150  # moving-shapes clips per split (300 train / 60 test exist); None = all
    segment_frames: int = 16      # frames per segment: a 2-3 s clip becomes 4-5 ordered segments (I3D: 64)
    frames_per_segment: int = 1   # frames the image encoder sees per segment (about 7 frames/s here)
    recipe: Recipe = field(default_factory=Recipe)  # the P-Former's settings and n_prompt: the image demo's
                                  # (prompt slots: paper 32 = VATEX's segments; 8 keeps the CPU run short)
    align_steps: int = 600        # the alignment-only phase (cheap: the LLM is not run); 60 left the prompts
                                  # 11-14x farther from the targets than their mean (bench/video_align.py,
                                  # 3 seeds: CIDEr 2.9 after 60 steps, 6.1 after 600, ITG only 3.1)
    lm_steps: int = 80            # the LM phase, the same for both variants (about 1 s each)
    lr: float = 1e-4              # the paper's, at batch 16 here
    llm_proj_lr_scale: float = 10.0  # llm_proj at 10x and clipping: small-batch LM training needs both (as the
    max_grad_norm: float = 1.0       # image demo; bench/stage2_lr.py)
    batch_size: int = 16
    caption_clips: int = 60       # test clips captioned per variant
    examples: int = 4
    seed: int = 42
    scale: float = 1.0            # multiplies every step count and the evaluation size

    def scaled(self) -> "VideoDemoConfig":
        s = self.scale
        return replace(self, recipe=replace(self.recipe, pformer_steps=round(self.recipe.pformer_steps * s)),
                       align_steps=round(self.align_steps * s),
                       lm_steps=round(self.lm_steps * s), caption_clips=round(self.caption_clips * s), scale=1.0)


SMOKE = VideoDemoConfig(clips_per_split=24, recipe=Recipe(pformer_steps=4, pformer_batch_size=8, n_prompt=4),
                        align_steps=3, lm_steps=3, batch_size=4, caption_clips=6, examples=2)


def run_video_demo(config: VideoDemoConfig) -> dict:
    """Every phase in order; returns both variants' caption metrics."""
    c = config.scaled()
    started, root = time.perf_counter(), default_cache_root()
    tag = data_tag(c)
    steps = f"{c.recipe.pformer_steps}-{c.align_steps}-{c.lm_steps}"
    work = root / "runs" / "demo-video" / f"{tag}-{c.recipe.n_prompt}s-{steps}-{settings_digest(c)}"

    say("[bold]1/7 prepare moving-shapes[/] (generated .mp4 clips of a shape moving, captioned)")
    data = prepare_dataset("moving-shapes", out_root=root / "data" / tag, limit=c.clips_per_split)

    say("[bold]2/7 extract features[/]: the bundled EfficientNet-Lite0 on sampled frames of each segment")
    features = root / "features" / f"{tag}__efficientnet-lite0-video-{c.segment_frames}f"
    extract_video_features(VideoExtractConfig(data=str(data), out=str(features), segment_frames=c.segment_frames,
                                              segment_stride=c.segment_frames, frames_per_segment=c.frames_per_segment,
                                              shard_size=64, num_workers=1))

    say("[bold]3/7 train the P-Former[/] on the train captions, against the frozen SmolLM2-135M")
    train_captions = str(data / "captions_train.json")
    pformer = pformer_run(c)
    train_once(pformer, lambda resume: train_pformer(pformer_config(
        c.recipe, [train_captions], pformer, heldout=8, seed=c.seed, resume=resume)))

    say("[bold]4/7 build reference prompts[/] for every train caption")
    prompts = root / "prompts" / f"{tag}__{pformer.name}"
    build_prompts(BuildPromptsConfig(pformer=str(pformer / "final"), captions=[train_captions], out=str(prompts)))
    print_prompt_check(prompts)

    runs = {}
    for name, w in VARIANTS.items():
        say(f"[bold]5/7 {name}[/]: " + ("LM loss alone" if w == 0 else f"{w:g} x L_align alone, then LM loss alone"))
        run = runs[name] = work / name
        train_once(run, lambda resume: train_video_adapter(VideoAdapterConfig(
            features=str(features), prompts=str(prompts), captions=[train_captions], w_align=w, out=str(run),
            n_prompt=c.recipe.n_prompt, max_steps=c.lm_steps, align_steps=c.align_steps, batch_size=c.batch_size, lr=c.lr,
            llm_proj_lr_scale=c.llm_proj_lr_scale, max_grad_norm=c.max_grad_norm,
            warmup_steps=max(1, c.lm_steps // 10), seed=c.seed, save_every=max(10, c.lm_steps // 2), log_every=1,
            resume=resume)))

    say("[bold]6/7 caption the test clips[/] with each adaptor")
    results = {name: {**caption_test_clips(run, features, data, c), **attribute_accuracy(run, data)} for name, run in runs.items()}

    say("[bold]7/7 results[/]: LM only (ITG only) against P-Former alignment then LM, same seed and LM steps")
    rows, columns = compare_runs(list(runs.values()))
    print_compare(rows, [*columns[:2], *runs])
    _print_attributes(results)
    _examples(runs, data, c)
    _curves(work, runs)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    say(f"[green]video demo finished[/] in {(time.perf_counter() - started) / 60:.1f} min: runs and evaluations in {work}")
    return results


def data_tag(c: VideoDemoConfig) -> str:
    """Names the clips' data, features and prompt folders."""
    return f"moving-shapes-{c.clips_per_split or 'all'}"


def pformer_run(c: VideoDemoConfig) -> Path:
    """The P-Former's run folder, named by what trains it (bench/video_align.py finds its prompts by it)."""
    return default_cache_root() / "runs" / "pformer" / f"demo-{data_tag(c)}-{pformer_tag(c.recipe)}"


def caption_test_clips(run: Path, features: Path, data: Path, c: VideoDemoConfig) -> dict:
    """docs/method.md#generation-settings' beam 5, but the empty text prompt the adaptor was trained under and 1..12 new
    tokens: the captions are 5 words, not COCO's 10-plus."""
    out = run / "eval" / "caption-moving-shapes"
    if not captions_current(out):
        eval_caption(EvalConfig(adapter=str(run), features=str(features), data=str(data / "captions_test.json"),
                                out=str(out), limit=c.caption_clips, prompt="", min_new_tokens=1, max_new_tokens=12))
    return json.loads((out / "metrics.json").read_text())["metrics"]


ATTRIBUTES = ("color", "shape", "direction")  # the caption JSON's fields: "a {color} {shape} moves {direction}"


def attribute_accuracy(run: Path, data: Path) -> dict[str, float]:
    """Share of captioned test clips whose first colour / shape / direction word is the true one:
    what BLEU hides (a frequent shape and colour score well with every direction wrong)."""
    truth = {str(e["image_id"]): e for e in json.loads((data / "captions_test.json").read_text())}
    words = {a: {e[a] for e in truth.values()} for a in ATTRIBUTES}
    predictions = json.loads((run / "eval" / "caption-moving-shapes" / "predictions.json").read_text())
    right = dict.fromkeys(ATTRIBUTES, 0)
    for p in predictions:
        said = p["caption"].lower().replace(".", " ").split()
        for a in ATTRIBUTES:
            right[a] += next((w for w in said if w in words[a]), None) == truth[str(p["image_id"])][a]
    return {f"{a}_accuracy": right[a] / max(1, len(predictions)) for a in ATTRIBUTES}


def _print_attributes(results: dict[str, dict]) -> None:
    from rich.table import Table

    table = Table("attribute", *results, title="test clips whose caption names it right")
    for a in ATTRIBUTES:
        table.add_row(a, *(f"{r[f'{a}_accuracy']:.0%}" for r in results.values()))
    console.print(table)


def _examples(runs: dict[str, Path], data: Path, c: VideoDemoConfig) -> None:
    from rich.table import Table

    table = Table("test clip", "caption", *runs, title="example captions")
    predictions = {name: {str(p["image_id"]): p["caption"] for p in json.loads(
        (run / "eval" / "caption-moving-shapes" / "predictions.json").read_text())} for name, run in runs.items()}
    for entry in json.loads((data / "captions_test.json").read_text())[:c.examples]:
        refs = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        table.add_row(entry["image"], refs[0], *(predictions[name].get(str(entry["image_id"]), "-") for name in runs))
    console.print(table)


def _curves(work: Path, runs: dict[str, Path]) -> None:
    from blitext.plot import plot_runs

    say(f"  loss curves: {plot_runs(list(runs.values()), work / 'curves.png', labels=list(runs))}")
