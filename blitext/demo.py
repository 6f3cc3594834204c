"""`blitext demo`: the whole method end to end on the embedded default, baseline against P-Former.

Like the paper's Table 4 in miniature, on easy-VQA and the bundled models (EfficientNet-Lite0,
MiniLM, SmolLM2-135M): prepare the data, cache the image features, train the P-Former on the
caption text, cache the reference prompts, then train the Q-Former twice with the same seed
and steps - the baseline (w1 = w2 = 0, plain BLIP-2) and P-Former alignment (w1 = 10,
w2 = 100) - and evaluate both: zero-shot VQA on easy-VQA's real test questions and
captioning of the test images. Prints the side-by-side table and a few generations, writes
PNG loss curves. Every finished phase is reused when run again; an interrupted one resumes.

Sized for a 2-core CPU (under 20 minutes); `--scale` multiplies the training steps and the
evaluation sizes, `--smoke` runs every phase with a handful of steps (for tests and CI).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from blitext.adapter import AdapterConfig, train_adapter
from blitext.check_prompts import check_prompts, format_report
from blitext.config import default_cache_root
from blitext.console import console, say
from blitext.data.compose import compositional_captions
from blitext.data.prepare import prepare_dataset
from blitext.evaluate import EvalConfig, compare_runs, eval_caption, eval_vqa, print_compare
from blitext.extract import ExtractConfig, extract_features
from blitext.models.loading import load_llm
from blitext.pformer import PFormerConfig, train_pformer
from blitext.prompts import BuildPromptsConfig, build_prompts, prompts_from_cache

VARIANTS = {"baseline": (0.0, 0.0), "pformer": (10.0, 100.0)}  # (w1, w2): Table 4's first and last rows


@dataclass
class DemoConfig:
    images_per_split: int = 500   # easy-VQA train and test images used (4,000 / 1,000 exist); CPU-sized
    pformer_steps: int = 200      # P-Former steps at batch 16 (about 2.5 s each on 2 cores)
    n_prompt: int = 8             # soft prompts per sentence = Q-Former queries (paper: 32; 8 keeps the CPU run short)
    stage1_steps: int = 50        # Q-Former stage-1 steps at batch 16 (about 2 s each)
    stage1_lr: float = 1e-3       # stage 1 tolerates a high rate: ~50 steps instead of the paper's 10 epochs of 4M pairs
    stage2_steps: int = 120       # stage-2 steps at batch 8 (about 1 s each: the frozen LLM runs)
    stage2_lr: float = 5e-5       # body rate at batch 8: 1e-4 and above diverged here (paper: 1e-4 at batch 1024)
    stage2_llm_proj_lr_scale: float = 20.0  # llm_proj at 20x: with it and clipping the LM loss fell 8.2 -> 5.0
    stage2_max_grad_norm: float = 1.0       # in 40 steps, where one rate for all and no clipping rose to 9.1
    batch_size: int = 16          # stage 1; stage 2 uses half: more, smaller steps learned faster here
    vqa_questions: int = 120      # easy-VQA test questions answered zero-shot per variant
    caption_images: int = 50      # test images captioned per variant
    examples: int = 4             # test images whose generations are printed
    seed: int = 42
    scale: float = 1.0            # multiplies every step count and evaluation size

    def scaled(self) -> "DemoConfig":
        s = self.scale
        return replace(self, pformer_steps=round(self.pformer_steps * s), stage1_steps=round(self.stage1_steps * s),
                       stage2_steps=round(self.stage2_steps * s), vqa_questions=round(self.vqa_questions * s),
                       caption_images=round(self.caption_images * s), scale=1.0)


SMOKE = DemoConfig(images_per_split=48, pformer_steps=4, n_prompt=4, stage1_steps=3, stage2_steps=3, batch_size=4,
                   vqa_questions=16, caption_images=8, examples=2)


def run_demo(config: DemoConfig) -> dict:
    """Every phase in order; returns the evaluation metrics of both variants."""
    c = config.scaled()
    started = time.perf_counter()
    root = default_cache_root()
    tag = f"easy-vqa-{c.images_per_split}"
    steps = f"{c.pformer_steps}-{c.stage1_steps}-{c.stage2_steps}"
    work = root / "runs" / "demo" / f"{tag}-{c.n_prompt}q-{steps}-{settings_digest(c)}"

    say("[bold]1/8 prepare easy-VQA[/] (real images and questions from the easy-vqa package)")
    data = prepare_dataset("easy-vqa", out_root=root / "data" / tag, limit=c.images_per_split)

    say("[bold]2/8 extract features[/] with the bundled EfficientNet-Lite0 (train and test images)")
    features = root / "features" / f"{tag}__efficientnet-lite0"
    extract_features(ExtractConfig(data=str(data), out=str(features)))

    say("[bold]3/8 train the P-Former[/] on caption text, against the frozen SmolLM2-135M")
    pformer = root / "runs" / "pformer" / f"demo-{tag}-{c.n_prompt}x{c.pformer_steps}"
    text = root / "data" / "compositional.txt"
    text.write_text("\n".join(compositional_captions()) + "\n")
    train_once(pformer, lambda resume: train_pformer(PFormerConfig(
        text=[str(data / "captions_train.json"), str(text)], out=str(pformer), n_prompt=c.n_prompt, batch_size=16,
        max_steps=c.pformer_steps, warmup_steps=max(1, c.pformer_steps // 7), sample_every=max(1, c.pformer_steps // 2),
        save_every=100, heldout=32, seed=c.seed, resume=resume)))

    say("[bold]4/8 build reference prompts[/] for every easy-VQA caption")
    prompts = root / "prompts" / f"{tag}__{pformer.name}"
    build_prompts(BuildPromptsConfig(pformer=str(pformer / "final"), captions=[str(data / "captions_train.json")],
                                     out=str(prompts)))
    print_prompt_check(prompts)

    runs = {}
    for name, (w1, w2) in VARIANTS.items():
        say(f"[bold]5/8 {name}: Q-Former stage 1[/] (ITC + ITM + ITG + {w1:g} x L_align)")
        base = AdapterConfig(features=str(features), prompts=str(prompts), captions=[str(data / "captions_train.json")],
                             num_query=c.n_prompt, seed=c.seed, save_every=max(10, c.stage1_steps // 2), log_every=1)
        s1 = work / f"{name}-stage1"
        train_once(s1, lambda resume: train_adapter(replace(
            base, stage=1, w_align=w1, out=str(s1), max_steps=c.stage1_steps, warmup_steps=max(1, c.stage1_steps // 10),
            batch_size=c.batch_size, lr=c.stage1_lr, resume=resume)))
        say(f"[bold]6/8 {name}: stage 2[/] (frozen-LLM loss + {w2:g} x L_align, from stage 1)")
        s2 = work / f"{name}-stage2"
        train_once(s2, lambda resume: train_adapter(replace(
            base, stage=2, w_align=w2, init=str(s1), out=str(s2), resume=resume, **stage2_schedule(c))))
        runs[name] = (s1, s2)

    results = {}
    for name, (_, s2) in runs.items():
        say(f"[bold]7/8 evaluate {name}[/]: zero-shot VQA on easy-VQA's test questions, captions of test images")
        results[name] = _evaluate(s2, features, data, c)

    say("[bold]8/8 results[/]: baseline (w1 = w2 = 0) against P-Former alignment (w1 = 10, w2 = 100), same seed and steps")
    rows, columns = compare_runs([work / f"{name}-stage2" for name in VARIANTS])
    print_compare(rows, [*columns[:2], *VARIANTS])
    _examples(work, runs, features, data, c)
    _curves(work, runs)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    say(f"[green]demo finished[/] in {(time.perf_counter() - started) / 60:.1f} min: runs, evaluations and curves in {work}")
    return results


def settings_digest(c) -> str:
    """Runs are reused only under the same training settings (the rates are not in the folder name)."""
    settings = {k: v for k, v in asdict(c).items()
                if k not in ("vqa_questions", "caption_images", "caption_clips", "examples")}
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def stage2_schedule(c) -> dict:
    """The small-batch stage-2 settings the demo and ablate share (bench/stage2_lr.py measured them)."""
    return dict(max_steps=c.stage2_steps, warmup_steps=max(1, c.stage2_steps // 10), batch_size=c.batch_size // 2,
                lr=c.stage2_lr, llm_proj_lr_scale=c.stage2_llm_proj_lr_scale, max_grad_norm=c.stage2_max_grad_norm)


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
    report = check_prompts(vectors, llm.model.get_input_embeddings().weight.detach(), llm.tokenizer, keys,
                           n_examples=1)
    say(format_report(report))


def _evaluate(stage2: Path, features: Path, data: Path, c: DemoConfig) -> dict:
    """Zero-shot VQA with REFERENCE 4's settings; captions with the empty prompt the adaptor was
    trained under and at least 1 new token (REFERENCE's 8..30 are for COCO-length captions,
    easy-VQA's are 3-4 tokens)."""
    out = {}
    vqa_dir, cap_dir = stage2 / "eval" / "vqa-easy-vqa", stage2 / "eval" / "caption-easy-vqa"
    if not (vqa_dir / "metrics.json").is_file():
        eval_vqa(EvalConfig(adapter=str(stage2), features=str(features), data=str(data / "vqa_test_questions.json"),
                            annotations=str(data / "vqa_test_annotations.json"), out=str(vqa_dir),
                            limit=c.vqa_questions))
    if not (cap_dir / "metrics.json").is_file():
        eval_caption(EvalConfig(adapter=str(stage2), features=str(features), data=str(data / "captions_test.json"),
                                out=str(cap_dir), limit=c.caption_images, prompt="", min_new_tokens=1,
                                max_new_tokens=12))
    for d in (vqa_dir, cap_dir):
        out[d.name] = json.loads((d / "metrics.json").read_text())["metrics"]
    return out


def _examples(work: Path, runs: dict, features: Path, data: Path, c: DemoConfig) -> None:
    """A few test images: their human caption and each variant's caption."""
    from rich.table import Table

    table = Table("test image", "human caption", *runs, title="example generations")
    predictions = {name: {str(p["image_id"]): p["caption"] for p in
                          json.loads((s2 / "eval" / "caption-easy-vqa" / "predictions.json").read_text())}
                   for name, (_, s2) in runs.items()}
    refs = json.loads((data / "captions_test.json").read_text())
    for entry in refs[:c.examples]:
        image_id = str(entry["image_id"])
        table.add_row(entry["image"], entry["caption"][0] if isinstance(entry["caption"], list) else entry["caption"],
                      *(predictions[name].get(image_id, "-") for name in runs))
    console.print(table)


def _curves(work: Path, runs: dict) -> None:
    from blitext.plot import plot_runs

    for stage in (0, 1):
        paths = [r[stage] for r in runs.values()]
        png = plot_runs(paths, work / f"stage{stage + 1}-curves.png", labels=list(runs))
        say(f"  loss curves: {png}")
