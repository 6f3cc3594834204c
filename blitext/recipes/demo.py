"""`blitext demo`: the whole method end to end on the embedded default: Table 4's first and last rows.

On easy-VQA and the bundled models (EfficientNet-Lite0, MiniLM, SmolLM2-135M): prepare the data,
cache the image features, train the P-Former on the caption text, cache the reference prompts,
then train the Q-Former twice with the same seed, as the paper's Table 4 does:
- BLIP-2 (w1 = w2 = 0): stage 1 of ITC + ITM + ITG, then stage 2 of the frozen LLM's loss;
- P-Former (w1 = 10, w2 = 100): the same stage 1 + 10 x L_align, then stage 2 + 100 x L_align.
The recipe (blitext.recipes.recipe) is the small-scale one that `ablate` and bench/ also train with.

What it prints: the captions the LLM writes from the P-Former variant's stage-1 prompts (the LLM
never ran in training: backward decoupling made visible) beside the human ones and the
P-Former's own ceiling; the budget curve (exact match and CIDEr at stage-2 steps 0..200, from one
run's snapshots) with each variant's cost; the side-by-side table after stage 2 and one verdict
line per comparison. Every finished phase is reused when run again; an interrupted one resumes.
Sized for a 2-core CPU (under 20 minutes); `--scale` multiplies the training steps and the
evaluation sizes, `--smoke` runs every phase with a handful of steps (for tests and CI).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from blitext.atomic import read_json, write_json, write_text
from blitext.pformer.check import check_prompts, format_report
from blitext.config import default_cache_root
from blitext.console import console, say
from blitext.data.compose import compositional_captions
from blitext.data.prepare import prepare_dataset
from blitext.evaluation.compare import compare_runs, print_compare
from blitext.evaluation.evaluate import EvalConfig, answers_current, eval_vqa
from blitext.features.image import ExtractConfig, extract_features
from blitext.models.loading import load_llm
from blitext.pformer.train import train_pformer
from blitext.pformer.prompts import BuildPromptsConfig, build_prompts, prompts_from_cache
from blitext.recipes import budget
from blitext.recipes.recipe import Recipe, pformer_config, pformer_tag, train_cell, train_once

VARIANTS = {"baseline": (0.0, 0.0), "pformer": (10.0, 100.0)}  # (w1, w2): Table 4's first and last rows
LABELS = {"baseline": "BLIP-2 (0, 0)", "pformer": "P-Former (10, 100)"}
LATEST = "latest"  # runs/demo/latest: the last finished demo's folder (point_latest)


@dataclass
class DemoConfig:
    """What the demo runs: the data, the P-Former, the shared Q-Former recipe and the evaluation sizes."""
    images_per_split: int = 500   # easy-VQA train and test images used (4,000 / 1,000 exist); CPU-sized
    recipe: Recipe = field(default_factory=Recipe)  # the P-Former and the Q-Former's stages (shared with ablate, bench/)
    vqa_questions: int = 0        # easy-VQA test questions answered zero-shot (0: skipped; SmolLM2 cannot
                                  # answer them even from the caption as text, so the score shows nothing)
    caption_images: int = 100     # test images captioned at each point of the budget curve (greedy)
    examples: int = 6             # test images whose captions are printed
    seed: int = 42
    scale: float = 1.0            # multiplies every step count and evaluation size

    def scaled(self) -> "DemoConfig":
        s = self.scale
        return replace(self, recipe=self.recipe.scaled(s),
                       vqa_questions=round(self.vqa_questions * s), caption_images=round(self.caption_images * s),
                       scale=1.0)


SMOKE = DemoConfig(images_per_split=48, vqa_questions=0, caption_images=8, examples=2,
                   recipe=Recipe(pformer_steps=4, n_prompt=4, align_steps=2, stage1_steps=3, stage2_steps=4, batch_size=4, stage1_warmup_steps=1,
                                 stage2_warmup_steps=1, snapshot_steps=[2]))


def run_demo(config: DemoConfig) -> dict:
    """Every phase in order; returns the curves, costs and evaluations of both variants."""
    torch.use_deterministic_algorithms(True)  # the same seed prints the same table (README: which kernels)
    c = config.scaled()
    started = time.perf_counter()
    data, features, prompts = prepare_caches(c)
    r, work = c.recipe, demo_work(c)
    runs = {}
    for i, (name, (w1, w2)) in enumerate(VARIANTS.items()):
        say(f"[bold]{5 + i}/8 {LABELS[name]}[/]")
        runs[name] = train_cell(r, name, w1, w2, features, prompts, [str(data / "captions_train.json")], work, c.seed)
    say("[bold]7/8 evaluate[/]: greedy captions of test images after stage 1 and along stage 2 (the budget curve)")
    curves = {name: [budget.curve(s1, s2, features, data, c.caption_images)] for name, (s1, s2) in runs.items()}
    costs = {name: budget.costs(s1, s2) for name, (s1, s2) in runs.items()}
    results = {name: evaluate_variant(s2, features, data, c) for name, (_, s2) in runs.items()}
    ceiling = reference_ceiling(data, prompts, c)
    say(f"[bold]8/8 results[/] ({(time.perf_counter() - started) / 60:.1f} min)")
    summary = report(work, runs, results, curves, costs, ceiling, data, c)
    kernels = kernels_in_use()
    write_json(work / "results.json", {"evaluations": results, "curves": curves, "costs": costs, "ceiling": ceiling,
                                       **summary, "kernels": kernels})
    page = write_page(work, runs, curves, summary["verdicts"])
    point_latest(work)
    say(f"[green]demo finished[/] in {(time.perf_counter() - started) / 60:.1f} min ({kernels} kernels: the same seed "
        f"repeats every digit where they are the same): runs, evaluations and curves in {work}")
    say(f"report (open in a browser): {page}", soft_wrap=True)  # the last line: what to look at, whole
    return {"evaluations": results, "curves": curves, "costs": costs, "ceiling": ceiling, **summary}


def kernels_in_use() -> str:
    """Which kernels trained the demo: the GPU, or the vector width of torch's CPU kernels ("AVX2",
    "AVX512"). Wider vectors add in another order, so training rounds otherwise and ends at other
    digits: seed 42 gave README's table with AVX2 kernels and other digits with AVX512 (docs/results.md)."""
    if torch.cuda.is_available():
        return f"CUDA ({torch.cuda.get_device_name()})"
    return f"CPU {torch.backends.cpu.get_cpu_capability()}"


def point_latest(work: Path) -> None:
    """runs/demo/latest -> the demo just finished, so README's examples name it whatever the settings'
    digest; relative (a moved cache keeps it) and swapped in by one rename. Not being able to is a line."""
    link, spare = work.parent / LATEST, work.parent / f".{LATEST}.{os.getpid()}"
    try:
        spare.unlink(missing_ok=True)
        spare.symlink_to(work.name, target_is_directory=True)
        os.replace(spare, link)
    except OSError as e:
        spare.unlink(missing_ok=True)
        say(f"[yellow]{link} not updated[/] ({e.strerror or e}): name the run folder {work} instead")


def demo_work(c: DemoConfig) -> Path:
    """The run folder of one seed's cells (bench/budget.py's other seeds sit beside it)."""
    r = c.recipe
    return default_cache_root() / "runs" / "demo" / (
        f"easy-vqa-{c.images_per_split}-{r.n_prompt}q-{r.pformer_steps}-{r.align_steps}+{r.stage1_steps}-{r.stage2_steps}-"
        f"{settings_digest(c)}")


def prepare_caches(c: DemoConfig) -> tuple[Path, Path, Path]:
    """Phases 1-4: the data, its image features, the P-Former and its reference prompts (each reused)."""
    root, tag = default_cache_root(), f"easy-vqa-{c.images_per_split}"
    say("[bold]1/8 prepare easy-VQA[/] (real images and questions from the easy-vqa package)")
    data = prepare_dataset("easy-vqa", out_root=root / "data" / tag, limit=c.images_per_split)

    say("[bold]2/8 extract features[/] with the bundled EfficientNet-Lite0 (train and test images)")
    features = root / "features" / f"{tag}__efficientnet-lite0"
    extract_features(ExtractConfig(data=str(data), out=str(features)))

    say("[bold]3/8 train the P-Former[/] on caption text, against the frozen SmolLM2-135M")
    pformer = pformer_run(c)
    text = root / "data" / "compositional.txt"
    write_text(text, "\n".join(compositional_captions()) + "\n")
    train_once(pformer, lambda resume: train_pformer(pformer_config(
        c.recipe, [str(data / "captions_train.json"), str(text)], pformer, heldout=32, seed=c.seed, resume=resume)))

    say("[bold]4/8 build reference prompts[/] for every easy-VQA caption")
    prompts = root / "prompts" / f"{tag}__{pformer.name}"
    build_prompts(BuildPromptsConfig(pformer=str(pformer / "final"), captions=[str(data / "captions_train.json")],
                                     out=str(prompts)))
    print_prompt_check(prompts)
    return data, features, prompts


def settings_digest(c) -> str:
    """Runs are reused only under the same training settings (the rates are not in the folder name)."""
    settings = {k: v for k, v in asdict(c).items()
                if k not in ("vqa_questions", "caption_images", "caption_clips", "examples")}
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def print_prompt_check(prompts: Path) -> None:
    """check-prompts' report on the first 64 reference prompts (one example decoded)."""
    keys, vectors, llm_name = prompts_from_cache(prompts, 64)
    llm = load_llm(llm_name)
    report = check_prompts(vectors, llm.embedding_table, llm.tokenizer, keys, n_examples=1)
    say(format_report(report))


def pformer_run(c: DemoConfig) -> Path:
    return default_cache_root() / "runs" / "pformer" / f"demo-easy-vqa-{c.images_per_split}-{pformer_tag(c.recipe)}"


def reference_ceiling(data: Path, prompts: Path, c: DemoConfig) -> dict:
    """The P-Former's own prompts of the test captions, read by the LLM (reused once written)."""
    path = prompts / f"ceiling-{c.caption_images}.json"
    if not path.is_file():
        write_json(path, budget.reference_ceiling(pformer_run(c) / "final", data, c.caption_images))
    return read_json(path)


def evaluate_variant(stage2: Path, features: Path, data: Path, c: DemoConfig) -> dict:
    """The final adaptor's captions with every COCO metric (the table; the budget curve's last point),
    and zero-shot VQA with its text ceiling when asked for (vqa_questions > 0). Reused once written."""
    out = {"caption-easy-vqa": budget.caption_metrics(stage2, features, data, c.caption_images, meteor="auto")}
    if c.vqa_questions:
        vqa_dir = stage2 / "eval" / "vqa-easy-vqa"
        if not answers_current(vqa_dir):
            eval_vqa(EvalConfig(adapter=str(stage2), features=str(features), data=str(data / "vqa_test_questions.json"),
                                annotations=str(data / "vqa_test_annotations.json"), out=str(vqa_dir),
                                limit=c.vqa_questions))
        vqa = read_json(vqa_dir / "metrics.json")
        out |= {vqa_dir.name: vqa["metrics"], "text_ceiling": vqa.get("text_ceiling"),
                "base_rate": vqa.get("base_rate"), "ceiling_verdict": vqa.get("ceiling_verdict")}
    return out


def report(work: Path, runs: dict, results: dict, curves: dict, costs: dict, ceiling: dict, data: Path,
           c: DemoConfig) -> dict:
    """What a person reads: captions from alignment alone, the budget curve and costs, the table after
    stage 2, one verdict line per comparison, then the loss curves. Returns the verdicts."""
    _alignment_alone(runs, curves, ceiling, data, c)
    summ = budget.summary(curves)
    png = budget.plot_curves(curves, work / "budget-curve.png", LABELS)
    _budget_table(curves, costs)
    rows, columns = compare_runs([s2 for _, s2 in runs.values()])
    print_compare(rows, [*columns[:2], *(LABELS[n] for n in runs)])
    lines = verdicts(results, curves, costs, ceiling, summ, c)
    for line in lines:
        say(line)
    say(f"  budget curve: {png}")
    _curves(work, runs)
    return {"summary": summ, "verdicts": lines}


def verdicts(results: dict, curves: dict, costs: dict, ceiling: dict, summ: dict, c: DemoConfig) -> list[str]:
    """One line per comparison: alignment alone, the budget, the end of stage 2 (and VQA when run)."""
    zero = {name: points[0][0] for name, points in curves.items()}
    end = {name: points[0][-1] for name, points in curves.items()}
    p, b = end["pformer"], end["baseline"]
    lines = [f"alignment alone (stage 1, the LLM never ran): the LLM writes the exact caption of "
             f"{zero['pformer']['exact_match']:.2f} of {c.caption_images} test images from the P-Former variant's "
             f"prompts (ceiling: {ceiling['exact_match']:.2f} from the P-Former's own prompts; BLIP-2's stage 1 "
             f"leaves llm_proj untrained: 0.00)",
             "budget: " + budget.verdict(summ, LABELS) + f" (greedy, {c.caption_images} test images, seed {c.seed}; "
             f"over 3 seeds: bench/budget.py); stage 1 costs no LLM pass: "
             + ", ".join(f"{LABELS[n]} {k['llm_forward_pairs']:,} LLM passes / {k['pairs_seen']:,} pairs seen / "
                         f"{(k['stage1']['seconds'] + k['stage2']['seconds']) / 60:.1f} min" for n, k in costs.items()),
             f"after {end['pformer']['step']} stage-2 steps: P-Former {p['exact_match']:.2f} vs BLIP-2 "
             f"{b['exact_match']:.2f} exact match, CIDEr {p['CIDEr']:.2f} vs {b['CIDEr']:.2f} (one seed: {c.seed})"]
    if c.vqa_questions:
        vqa = {name: r["vqa-easy-vqa"]["accuracy"] for name, r in results.items()}
        verdict = results["pformer"].get("ceiling_verdict") or {}
        lines.append(f"VQA: P-Former {vqa['pformer']:.1f} vs BLIP-2 {vqa['baseline']:.1f} ({c.vqa_questions} "
                     f"questions); " + (verdict.get("line") or "no text ceiling available"))
    else:
        lines.append("VQA: not run (--vqa-questions 0): SmolLM2-135M answers easy-VQA's questions below the "
                     "majority answer even given the caption as text, so its score cannot show anything")
    return lines


def write_page(work: Path, runs: dict, curves: dict, lines: list[str]) -> Path:
    """The report a person looks at (blitext report): the table, these verdicts, test images with every
    variant's caption, the loss curves and the budget curve (budget.json beside the runs)."""
    from blitext.evaluation.report import BUDGET_FILE, ReportConfig, write_report

    write_json(work / BUDGET_FILE, {"metric": "exact match", "x": "stage-2 steps",
                                    "runs": {LABELS[n]: [[p["step"], p["exact_match"]] for p in points[0]]
                                             for n, points in curves.items()}})
    return write_report(ReportConfig(runs=[str(s2) for _, s2 in runs.values()], labels=[LABELS[n] for n in runs],
                                     out=str(work / "report.html"), verdicts=lines, title="blitext demo"))


def _alignment_alone(runs: dict, curves: dict, ceiling: dict, data: Path, c: DemoConfig) -> None:
    """Test images: the human caption, what the LLM writes from the P-Former variant's stage-1 prompts
    (no LLM step yet) and from the P-Former's own prompt of the human caption (the ceiling)."""
    from rich.table import Table

    predictions = _predictions(runs["pformer"][0] / "eval" / f"caption-easy-vqa-{c.caption_images}")
    table = Table("test image", "human caption", "LLM reads the P-Former's prompt of it (ceiling)",
                  "LLM reads the adaptor after stage 1 (no LLM step)",
                  title=f"captions from alignment alone: {curves['pformer'][0][0]['exact_match']:.2f} exact "
                        f"(ceiling {ceiling['exact_match']:.2f})")
    refs = read_json(data / "captions_test.json")
    for entry, (_, ceiling_caption) in zip(refs[:c.examples], ceiling["examples"]):
        human = entry["caption"][0] if isinstance(entry["caption"], list) else entry["caption"]
        table.add_row(entry["image"], human, _marked(ceiling_caption, human),
                      _marked(predictions.get(str(entry["image_id"]), "-"), human))
    console.print(table)


def _predictions(folder: Path) -> dict[str, str]:
    return {str(p["image_id"]): p["caption"] for p in read_json(folder / "predictions.json")}


def _marked(caption: str, human: str) -> str:
    return caption if caption.strip().lower() == human.strip().lower() else f"[red]{caption}[/]"


def _budget_table(curves: dict, costs: dict) -> None:
    """The curve with a row per stage-2 step (two variants fit 80 columns; a row per variant did not),
    then what each variant cost."""
    from rich.table import Table

    steps = sorted({p["step"] for runs in curves.values() for p in runs[0]})
    by_step = {name: {p["step"]: p for p in runs[0]} for name, runs in curves.items()}
    table = Table("stage-2 step", *(LABELS[n] for n in curves),
                  title="the budget curve: exact match (CIDEr) of greedy test captions")
    for s in steps:
        table.add_row(str(s), *(f"{by_step[n][s]['exact_match']:.2f} ({by_step[n][s]['CIDEr']:.2f})"
                                if s in by_step[n] else "-" for n in curves))
    console.print(table)
    cost = Table("variant", "LLM passes", "pairs seen", "stage 1 min", "stage 2 min",
                 title="what each variant cost (stage 1 never runs the LLM)")
    for name in curves:
        k = costs[name]
        cost.add_row(LABELS[name], f"{k['llm_forward_pairs']:,}", f"{k['pairs_seen']:,}",
                     f"{k['stage1']['seconds'] / 60:.1f}", f"{k['stage2']['seconds'] / 60:.1f}")
    console.print(cost)


def _curves(work: Path, runs: dict) -> None:
    from blitext.plot import plot_runs

    stage1 = [s1 for s1, _ in runs.values()]
    say(f"  stage-1 curves: {plot_runs(stage1, work / 'stage1-curves.png', labels=[LABELS[n] for n in runs])}")
    stage2 = [s2 for _, s2 in runs.values()]
    say(f"  stage-2 curves: {plot_runs(stage2, work / 'stage2-curves.png', labels=[LABELS[n] for n in runs])}")
