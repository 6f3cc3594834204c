"""`blitext demo`: the whole method end to end on the embedded default, baseline against P-Former.

Like the paper's Table 4 in miniature, on easy-VQA and the bundled models (EfficientNet-Lite0,
MiniLM, SmolLM2-135M): prepare the data, cache the image features, train the P-Former on the
caption text, cache the reference prompts, then train the Q-Former twice with the same seed
and stage-2 steps - the baseline (w1 = w2 = 0: the frozen LLM's loss alone) and P-Former
alignment (w1 = 10: a stage 1 of L_align alone; w2 = 100 beside the LLM's loss in stage 2) -
and evaluate both: greedy captions of test images (exact match, COCO metrics) and zero-shot
VQA on easy-VQA's real test questions beside its text ceiling. Prints the side-by-side table,
one verdict line per comparison, example captions, and writes PNG loss curves. Every finished
phase is reused when run again; an interrupted one resumes.

DemoConfig is a documented small-scale recipe (bench/demo_recipe.py, README); the paper's
defaults stay in AdapterConfig. Sized for a 2-core CPU (under 20 minutes); `--scale`
multiplies the training steps and the evaluation sizes, `--smoke` runs every phase with a
handful of steps (for tests and CI).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from blitext.adapter.image import AdapterConfig, train_adapter
from blitext.atomic import read_json, write_json, write_text
from blitext.pformer.check import check_prompts, format_report
from blitext.config import default_cache_root
from blitext.console import console, say
from blitext.data.compose import compositional_captions
from blitext.data.prepare import prepare_dataset
from blitext.evaluation.compare import compare_runs, print_compare
from blitext.evaluation.evaluate import EvalConfig, eval_caption, eval_vqa
from blitext.features.image import ExtractConfig, extract_features
from blitext.models.loading import load_llm
from blitext.pformer.train import PFormerConfig, train_pformer
from blitext.pformer.prompts import BuildPromptsConfig, build_prompts, prompts_from_cache

VARIANTS = {"baseline": (0.0, 0.0), "pformer": (10.0, 100.0)}  # (w1, w2): Table 4's first and last rows


@dataclass
class DemoConfig:
    """The small-scale recipe (bench/demo_recipe.py measured it; the paper's defaults stay in AdapterConfig)."""
    images_per_split: int = 500   # easy-VQA train and test images used (4,000 / 1,000 exist); CPU-sized
    pformer_steps: int = 200      # P-Former steps at batch 16 (about 1.5 s each on 2 cores)
    n_prompt: int = 8             # soft prompts per sentence = Q-Former queries (paper: 32; 8 keeps the CPU run short)
    num_layers: int = 4           # the Q-Former keeps MiniLM's first 4 of 6 layers
    cross_attention_frequency: int = 1  # cross-attention to the image in every layer (paper: every 2nd)
    dropout: float = 0.0          # MiniLM's 0.1 taught prompts that worked only with noise on them (README)
    align_steps: int = 400        # P-Former variant's stage 1: L_align alone (no LLM, ~0.3 s a step)
    align_lr: float = 1e-3        # a fresh alignment tolerates a high rate
    align_llm_proj_lr_scale: float = 10.0  # llm_proj at 10x: at 1x the alignment sat at the prompts' mean square
    stage2_steps: int = 200       # stage-2 steps at batch_size (about 0.8 s each: the frozen LLM runs)
    stage2_lr: float = 1e-4       # the paper's rate
    stage2_max_grad_norm: float = 1.0  # clipping keeps the first steps at batch 16 from jumping
    batch_size: int = 16
    vqa_questions: int = 120      # easy-VQA test questions answered zero-shot per variant
    caption_images: int = 100     # test images captioned per variant (greedy)
    examples: int = 6             # test images whose captions are printed
    seed: int = 42
    scale: float = 1.0            # multiplies every step count and evaluation size

    def scaled(self) -> "DemoConfig":
        s = self.scale
        return replace(self, pformer_steps=round(self.pformer_steps * s), align_steps=round(self.align_steps * s),
                       stage2_steps=round(self.stage2_steps * s), vqa_questions=round(self.vqa_questions * s),
                       caption_images=round(self.caption_images * s), scale=1.0)


SMOKE = DemoConfig(images_per_split=48, pformer_steps=4, n_prompt=4, align_steps=3, stage2_steps=3, batch_size=4,
                   vqa_questions=16, caption_images=8, examples=2)


def run_demo(config: DemoConfig) -> dict:
    """Every phase in order; returns the evaluation metrics of both variants."""
    torch.use_deterministic_algorithms(True)  # the same seed prints the same table (README: which kernels)
    c = config.scaled()
    started = time.perf_counter()
    data, features, prompts = prepare_caches(c)
    work = default_cache_root() / "runs" / "demo" / (
        f"easy-vqa-{c.images_per_split}-{c.n_prompt}q-{c.pformer_steps}-{c.align_steps}-{c.stage2_steps}-"
        f"{settings_digest(c)}")
    runs = {name: train_variant(c, name, w1, w2, features, prompts, data, work)
            for name, (w1, w2) in VARIANTS.items()}
    results = {}
    for name, (_, s2) in runs.items():
        say(f"[bold]7/8 evaluate {name}[/]: captions of test images (greedy), zero-shot VQA with its text ceiling")
        results[name] = evaluate_variant(s2, features, data, c)
    say(f"[bold]8/8 results[/] ({(time.perf_counter() - started) / 60:.1f} min)")
    report(work, runs, results, data, c)
    write_json(work / "results.json", results)
    say(f"[green]demo finished[/] in {(time.perf_counter() - started) / 60:.1f} min: runs, evaluations and curves in {work}")
    from blitext.evaluation.report import ReportConfig, write_report  # the page to look at (blitext report)
    say(f"report: {write_report(ReportConfig([str(s2) for _, s2 in runs.values()], str(work / 'report.html'), list(runs)))}")
    return results


def prepare_caches(c: DemoConfig) -> tuple[Path, Path, Path]:
    """Phases 1-4: the data, its image features, the P-Former and its reference prompts (each reused)."""
    root, tag = default_cache_root(), f"easy-vqa-{c.images_per_split}"
    say("[bold]1/8 prepare easy-VQA[/] (real images and questions from the easy-vqa package)")
    data = prepare_dataset("easy-vqa", out_root=root / "data" / tag, limit=c.images_per_split)

    say("[bold]2/8 extract features[/] with the bundled EfficientNet-Lite0 (train and test images)")
    features = root / "features" / f"{tag}__efficientnet-lite0"
    extract_features(ExtractConfig(data=str(data), out=str(features)))

    say("[bold]3/8 train the P-Former[/] on caption text, against the frozen SmolLM2-135M")
    pformer = root / "runs" / "pformer" / f"demo-{tag}-{c.n_prompt}x{c.pformer_steps}"
    text = root / "data" / "compositional.txt"
    write_text(text, "\n".join(compositional_captions()) + "\n")
    train_once(pformer, lambda resume: train_pformer(PFormerConfig(
        text=[str(data / "captions_train.json"), str(text)], out=str(pformer), n_prompt=c.n_prompt, batch_size=16,
        max_steps=c.pformer_steps, warmup_steps=max(1, c.pformer_steps // 7), sample_every=max(1, c.pformer_steps // 2),
        save_every=100, heldout=32, seed=c.seed, resume=resume)))

    say("[bold]4/8 build reference prompts[/] for every easy-VQA caption")
    prompts = root / "prompts" / f"{tag}__{pformer.name}"
    build_prompts(BuildPromptsConfig(pformer=str(pformer / "final"), captions=[str(data / "captions_train.json")],
                                     out=str(prompts)))
    print_prompt_check(prompts)
    return data, features, prompts


def train_variant(c: DemoConfig, name: str, w1: float, w2: float, features: Path, prompts: Path, data: Path,
                  work: Path, align_loss: str = "mse") -> tuple[Path | None, Path]:
    """Stage 1 is L_align alone (the video path's order; ITC/ITM/ITG are left to `blitext ablate`), so at
    w1 = 0 there is nothing to train and stage 2 starts from MiniLM; stage 2 is the LLM's loss + w2 L_align."""
    base = AdapterConfig(features=str(features), prompts=str(prompts), captions=[str(data / "captions_train.json")],
                         n_prompt=c.n_prompt, num_layers=c.num_layers,
                         cross_attention_frequency=c.cross_attention_frequency, dropout=c.dropout, seed=c.seed,
                         batch_size=c.batch_size, log_every=1, align_loss=align_loss)
    s1 = None
    if w1 > 0:
        say(f"[bold]5/8 {name}: stage 1[/] ({c.align_steps} steps of {w1:g} x L_align alone: the LLM never runs)")
        s1 = work / f"{name}-stage1"
        train_once(s1, lambda resume: train_adapter(replace(
            base, stage=1, w_align=w1, align_steps=c.align_steps, max_steps=0, lr=c.align_lr,
            llm_proj_lr_scale=c.align_llm_proj_lr_scale, warmup_steps=max(1, c.align_steps // 10),
            save_every=max(10, c.align_steps // 2), out=str(s1), resume=resume)))
    else:
        say(f"[bold]5/8 {name}: no stage 1[/] (w1 = 0: the demo's stage 1 is L_align alone)")
    say(f"[bold]6/8 {name}: stage 2[/] (frozen-LLM loss + {w2:g} x L_align, {c.stage2_steps} steps)")
    s2 = work / f"{name}-stage2"
    train_once(s2, lambda resume: train_adapter(replace(
        base, stage=2, w_align=w2, init=s1 and str(s1), out=str(s2), max_steps=c.stage2_steps, lr=c.stage2_lr,
        warmup_steps=max(1, c.stage2_steps // 10), max_grad_norm=c.stage2_max_grad_norm,
        save_every=max(10, c.stage2_steps // 2), resume=resume)))
    return s1, s2


def settings_digest(c) -> str:
    """Runs are reused only under the same training settings (the rates are not in the folder name)."""
    settings = {k: v for k, v in asdict(c).items()
                if k not in ("vqa_questions", "caption_images", "caption_clips", "examples")}
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def train_once(run: Path, train) -> None:
    """Train unless `<run>/final` exists; resume an interrupted run."""
    if (run / "final").is_dir():
        say(f"  reusing {run / 'final'}")
        return
    train("latest" if (run / "checkpoints").exists() else None)


def print_prompt_check(prompts: Path) -> None:
    """check-prompts' report on the first 64 reference prompts (one example decoded)."""
    keys, vectors, llm_name = prompts_from_cache(prompts, 64)
    llm = load_llm(llm_name)
    report = check_prompts(vectors, llm.embedding_table, llm.tokenizer, keys, n_examples=1)
    say(format_report(report))


def evaluate_variant(stage2: Path, features: Path, data: Path, c: DemoConfig) -> dict:
    """Captions of test images, greedy with the empty prompt the adaptor was trained under (the
    "a photo of", beam 5, 8..30 tokens of docs/method.md#generation-settings are for COCO-length
    captions; easy-VQA's are 3-4 tokens), and zero-shot VQA with the paper's settings and its text
    ceiling. Each evaluation is reused once written."""
    vqa_dir, cap_dir = stage2 / "eval" / "vqa-easy-vqa", stage2 / "eval" / "caption-easy-vqa"
    if not (cap_dir / "metrics.json").is_file():
        eval_caption(caption_eval(stage2, features, data, c, cap_dir))
    if not (vqa_dir / "metrics.json").is_file():
        eval_vqa(EvalConfig(adapter=str(stage2), features=str(features), data=str(data / "vqa_test_questions.json"),
                            annotations=str(data / "vqa_test_annotations.json"), out=str(vqa_dir),
                            limit=c.vqa_questions))
    vqa = read_json(vqa_dir / "metrics.json")
    return {cap_dir.name: read_json(cap_dir / "metrics.json")["metrics"], vqa_dir.name: vqa["metrics"],
            "text_ceiling": vqa.get("text_ceiling"), "base_rate": vqa.get("base_rate"),
            "ceiling_verdict": vqa.get("ceiling_verdict")}


def caption_eval(stage2: Path, features: Path, data: Path, c: DemoConfig, out: Path) -> EvalConfig:
    """The demo's captioning of test images: greedy, the empty prompt, 1..12 new tokens."""
    return EvalConfig(adapter=str(stage2), features=str(features), data=str(data / "captions_test.json"),
                      out=str(out), limit=c.caption_images, prompt="", num_beams=1, min_new_tokens=1,
                      max_new_tokens=12)


def report(work: Path, runs: dict, results: dict, data: Path, c: DemoConfig) -> None:
    """What a person reads first: the table, one verdict line per comparison, examples, then the curves."""
    rows, columns = compare_runs([s2 for _, s2 in runs.values()])
    print_compare(rows, [*columns[:2], *runs])
    for line in verdicts(results, runs, c):
        say(line)
    _examples(runs, data, c)
    _curves(work, runs)


def verdicts(results: dict, runs: dict, c: DemoConfig) -> list[str]:
    """One line per comparison: stage 2's start, captions (exact match, CIDEr), VQA (against its ceiling)."""
    start = {name: first_lm_loss(s2) for name, (_, s2) in runs.items()}
    cap = {name: r["caption-easy-vqa"] for name, r in results.items()}
    p, b = cap["pformer"], cap["baseline"]
    lines = [f"stage 2 starts at LM loss {start['pformer']:.2f} (P-Former) vs {start['baseline']:.2f} (baseline), "
             f"mean of its first 5 steps: what L_align alone taught before the LLM ever ran",
             f"captions: P-Former {p['exact_match']:.2f} vs baseline {b['exact_match']:.2f} exact match, "
             f"CIDEr {p['CIDEr']:.2f} vs {b['CIDEr']:.2f} ({c.caption_images} test images, one seed: {c.seed}; "
             f"over seeds see README)"]
    vqa = {name: r["vqa-easy-vqa"]["accuracy"] for name, r in results.items()}
    verdict = results["pformer"].get("ceiling_verdict") or {}
    lines.append(f"VQA: P-Former {vqa['pformer']:.1f} vs baseline {vqa['baseline']:.1f} ({c.vqa_questions} questions); "
                 + (verdict.get("line") or "no text ceiling available"))
    return lines


def first_lm_loss(run: Path, steps: int = 5) -> float:
    from blitext.training import read_metrics

    lm = [m["lm"] for m in read_metrics(run / "metrics.jsonl") if "lm" in m][:steps]
    return sum(lm) / len(lm)


def _examples(runs: dict, data: Path, c: DemoConfig) -> None:
    """A few test images: their human caption and each variant's caption."""
    from rich.table import Table

    table = Table("test image", "human caption", *runs, title="example captions (test images)")
    predictions = {name: {str(p["image_id"]): p["caption"] for p in
                          read_json(s2 / "eval" / "caption-easy-vqa" / "predictions.json")}
                   for name, (_, s2) in runs.items()}
    refs = read_json(data / "captions_test.json")
    for entry in refs[:c.examples]:
        image_id = str(entry["image_id"])
        table.add_row(entry["image"], entry["caption"][0] if isinstance(entry["caption"], list) else entry["caption"],
                      *(predictions[name].get(image_id, "-") for name in runs))
    console.print(table)


def _curves(work: Path, runs: dict) -> None:
    from blitext.plot import plot_runs

    stage1 = {name: s1 for name, (s1, _) in runs.items() if s1 is not None}
    if stage1:
        say(f"  stage-1 curves: {plot_runs(list(stage1.values()), work / 'stage1-curves.png', labels=list(stage1))}")
    stage2 = [s2 for _, s2 in runs.values()]
    say(f"  stage-2 curves: {plot_runs(stage2, work / 'stage2-curves.png', labels=list(runs))}")
