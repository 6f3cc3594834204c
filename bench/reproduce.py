"""The paper's claim where the embedded default can show it: language learnt from text alone helps
when image-text pairs are scarce.

    python bench/reproduce.py [--sizes 50 100 200 500] [--seeds 42 1 2] [--smoke]
    python bench/reproduce.py --table      # README's table from bench/results/reproduce.json
    python bench/reproduce.py --cells 0,0 10,0 --sizes 50 100 --name reproduce-stage1-only   # a lever

easy-VQA is prepared with colour x shape combinations withheld from the paired train images
(`data prepare easy-vqa --withhold default`: 6 of 24), while the P-Former's text holds every
combination (captions_all_combinations.txt plus the demo's compositional sentences). For each
paired-data size and seed, Table 4's cells (0, 0) and (10, 100) train with the embedded recipe the demo
and ablate share (blitext.recipes.recipe.train_cell: BLIP-2's stage 1 + w1 L_align, then stage 2) and caption the same 500 test images, scored apart on the seen and
the withheld combinations (greedy exact match and CIDEr). One record per run and split goes to
bench/results/reproduce.json (w1, w2, paired_images, split, seed, exact, cider, commit); the
summary holds mean and std per cell and a paired sign test across (size, seed) per split.
Every finished phase under <cache>/runs/bench-reproduce is reused.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

from blitext.atomic import read_json  # noqa: E402
from blitext.config import default_cache_root  # noqa: E402
from blitext.metrics.stats import sign_test  # noqa: E402
from blitext.data.compose import compositional_captions  # noqa: E402
from blitext.data.easy_vqa import ALL_CAPTIONS_FILE  # noqa: E402
from blitext.data.prepare import prepare_dataset  # noqa: E402
from blitext.recipes.demo import SMOKE, VARIANTS, DemoConfig, settings_digest  # noqa: E402
from blitext.recipes.recipe import pformer_config, pformer_tag, train_cell, train_once  # noqa: E402
from blitext.evaluation.evaluate import EvalConfig, eval_caption  # noqa: E402
from blitext.features.image import ExtractConfig, extract_features  # noqa: E402
from blitext.pformer.train import train_pformer  # noqa: E402
from blitext.pformer.check import between_example_spread  # noqa: E402
from blitext.pformer.prompts import BuildPromptsConfig, PromptCache, build_prompts  # noqa: E402

SPLITS = ("seen", "withheld")
TEST_IMAGES = 500


def prepare(root: Path, size: int, test_images: int) -> tuple[Path, Path]:
    data = prepare_dataset("easy-vqa", out_root=root / "data" / f"withheld-{size}", limit=size,
                           withhold=("default",), test_limit=test_images)
    features = root / "features" / f"withheld-{size}"
    extract_features(ExtractConfig(data=str(data), out=str(features)))
    return data, features


def contrast_suffix(w_contrast: float) -> str:
    return "" if w_contrast == 1.0 else f"-c{w_contrast:g}"


def pformer_for_every_combination(root: Path, data: Path, c: DemoConfig, w_contrast: float = 1.0) -> Path:
    """One P-Former for every size: its text is every combination, never the paired captions alone."""
    text = root / "data" / "pformer-text.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text((data / ALL_CAPTIONS_FILE).read_text() + "\n".join(compositional_captions()) + "\n")
    run = root / "pformer" / f"{pformer_tag(c.recipe)}{contrast_suffix(w_contrast)}"
    train_once(run, lambda resume: train_pformer(replace(
        pformer_config(c.recipe, [str(text)], run, heldout=32, seed=42, resume=resume), w_contrast=w_contrast)))
    return run / "final"


def reference_spread(prompts: Path) -> float:
    """The reference prompts' between-caption spread as a share of their RMS (check-prompts' figure)."""
    cache = PromptCache(prompts)
    return round(between_example_spread(cache.get_batch(cache.keys).float()), 4)


def score(s2: Path, features: Path, data: Path, c: DemoConfig, split: str) -> dict:
    out = s2 / "eval" / f"caption-{split}"
    if not (out / "metrics.json").is_file():
        eval_caption(EvalConfig(adapter=str(s2), features=str(features), data=str(data / f"captions_test_{split}.json"),
                                out=str(out), prompt="", num_beams=1, min_new_tokens=1, max_new_tokens=12))
    metrics = read_json(out / "metrics.json")["metrics"]
    return {"exact": metrics["exact_match"], "cider": metrics["CIDEr"],
            **attributes_named(read_json(out / "predictions.json"), data / f"captions_test_{split}.json"),
            "trained_commit": read_json(s2 / "final" / "state.json")["provenance"]["git_commit"][:7]}


def attributes_named(predictions: list[dict], captions: Path) -> dict:
    """Share of captions that name the image's colour and its shape (easy-VQA's records say both):
    exact match alone cannot tell a variant that gets the shape and misses the colour from one that
    misses both."""
    truth = {r["image_id"]: (r["color"], r["shape"]) for r in read_json(captions)}
    words = [(truth[p["image_id"]], set(p["caption"].lower().split())) for p in predictions]
    return {"colour_named": sum(colour in w for (colour, _), w in words) / len(words),
            "shape_named": sum(shape in w for (_, shape), w in words) / len(words)}


BASELINE = VARIANTS["baseline"]


def cell_name(w: tuple[float, float], variant: str = "") -> str:
    return next((name for name, v in VARIANTS.items() if v == w), "cell") + f" ({w[0]:g},{w[1]:g})" + (
        f" {variant}" if variant and w != BASELINE else "")


def variant_name(w1: float, w2: float, align_loss: str, w_contrast: float = 1.0) -> str:
    """The run folder's name: the demo's variant names for its cells with the paper's L_align."""
    if (w1, w2) == BASELINE:
        return "baseline"
    name = next((n for n, v in VARIANTS.items() if v == (w1, w2)), f"w1_{w1:g}-w2_{w2:g}")
    return (name if align_loss == "mse" else f"{name}-{align_loss}") + contrast_suffix(w_contrast)


def paired_test(records: list[dict], split: str, cell: tuple[float, float]) -> dict:
    """`cell` against the baseline (0, 0) on the same (size, seed): wins, losses and the sign test."""
    pairs = {}
    for r in (r for r in records if r["split"] == split):
        pairs.setdefault((r["paired_images"], r["seed"]), {})[(r["w1"], r["w2"])] = r["exact"]
    diffs = [v[cell] - v[BASELINE] for v in pairs.values() if cell in v and BASELINE in v]
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return {"pairs": len(diffs), "cell_better": wins, "baseline_better": losses, "ties": len(diffs) - wins - losses,
            "sign_test_p": sign_test(wins, losses), "mean_difference": statistics.mean(diffs) if diffs else None}


def variant_labels(records: list[dict]) -> dict[tuple[float, float], str]:
    """Each cell's variant beyond its weights: L_align's form and the P-Former's contrastive weight
    (records older than these options used the paper's MSE and weight 1)."""
    def label(r: dict) -> str:
        parts = [r.get("align_loss", "mse")] if r.get("align_loss", "mse") != "mse" else []
        if r.get("pformer_w_contrast", 1.0) != 1.0:
            parts.append(f"P-Former contrast x{r['pformer_w_contrast']:g}")
        return ", ".join(parts)
    return {(r["w1"], r["w2"]): label(r) for r in records}


def cells_of(records: list[dict]) -> list[tuple[float, float]]:
    return sorted({(r["w1"], r["w2"]) for r in records})


def summarise(records: list[dict]) -> dict:
    """Mean and sample std per (split, size, cell) over seeds; every cell's paired test against (0, 0)."""
    groups = {}
    for r in records:
        groups.setdefault(f"{r['split']} n={r['paired_images']} ({r['w1']:g},{r['w2']:g})", []).append(r["exact"])
    labels = variant_labels(records)
    tests = {cell_name(cell, labels[cell]): {split: paired_test(records, split, cell) for split in SPLITS}
             for cell in cells_of(records) if cell != BASELINE}
    return {"cells": {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                          "runs": len(v)} for k, v in groups.items()}, "paired_sign_test": tests}


def markdown_table(result: dict) -> str:
    """README's table from a result file: exact match mean +- sample std over seeds (CIDEr mean
    beside it) per paired-data size, split and cell, then each cell's paired sign test against (0, 0)."""
    records = result["records"]

    def entry(size: int, split: str, w: tuple[float, float]) -> str:
        runs = [r for r in records if (r["paired_images"], r["split"], (r["w1"], r["w2"])) == (size, split, w)]
        if not runs:
            return "-"
        exact, cider = [r["exact"] for r in runs], [r["cider"] for r in runs]
        spread = statistics.stdev(exact) if len(exact) > 1 else 0.0
        return f"{statistics.mean(exact):.3f} ± {spread:.3f} ({statistics.mean(cider):.2f})"
    cells, sizes = cells_of(records), sorted({r["paired_images"] for r in records})
    labels = variant_labels(records)
    seeds = sorted({r["seed"] for r in records})
    head = ["paired images"] + [f"{split}: {cell_name(w, labels[w])}" for split in SPLITS for w in cells]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size in sizes:
        lines.append("| " + " | ".join([str(size)] + [entry(size, split, w) for split in SPLITS for w in cells]) + " |")
    if all("colour_named" in r for r in records):
        head = ["paired images"] + [f"withheld: {what} named, {cell_name(w, labels[w])}" for what in ("colour", "shape") for w in cells]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for size in sizes:
            row = [str(size)]
            for what in ("colour", "shape"):
                for w in cells:
                    runs = [r[f"{what}_named"] for r in records if (r["paired_images"], r["split"], (r["w1"], r["w2"]))
                            == (size, "withheld", w)]
                    row.append(f"{statistics.mean(runs):.2f}" if runs else "-")
            lines.append("| " + " | ".join(row) + " |")
    commits = sorted({r.get("commit", result.get("commit")) for r in records})
    trained = sorted({r["trained_commit"] for r in records if "trained_commit" in r})
    lines += ["", f"Exact match, mean ± sample std over seeds {', '.join(map(str, seeds))} (CIDEr mean in brackets); "
                  f"scored at commit {', '.join(commits)}"
                  + (f", trained at {', '.join(trained)}." if trained else ".")]
    for w in cells:
        for split in SPLITS if w != BASELINE else ():
            t = paired_test(records, split, w)
            if t["pairs"]:
                lines.append(f"- {split}, {cell_name(w, labels[w])} against baseline (0,0): better in {t['cell_better']} of "
                             f"{t['pairs']} (size, seed) pairs, worse in {t['baseline_better']}, {t['ties']} ties; "
                             f"mean difference {t['mean_difference']:+.3f}; two-sided sign test p = {t['sign_test_p']:.3g}")
    return "\n".join(lines)


LEVER_FILES = ("reproduce", "reproduce-stage1-only", "reproduce-centred", "reproduce-contrast", "reproduce-w2")


def levers_table(size: int = 50) -> str:
    """README's lever table: every cell of every claim-study result file at `size` pairs, each
    against the baseline on the same seeds (mean over seeds, sign test over them)."""
    results = Path(__file__).parent / "results"
    lines = ["| cell | seeds | seen exact | withheld exact | withheld colour named | vs baseline, seen | vs baseline, withheld |",
             "|---|---|---|---|---|---|---|"]
    baselines_shown = set()  # the baseline's seeds: a file over other seeds shows its own baseline row
    for name in LEVER_FILES:
        if not (results / f"{name}.json").is_file():
            continue
        records = [r for r in read_json(results / f"{name}.json")["records"] if r["paired_images"] == size]
        labels = variant_labels(records)
        for cell in cells_of(records):
            seeds = frozenset(r["seed"] for r in records if (r["w1"], r["w2"]) == cell)
            if cell == BASELINE and seeds in baselines_shown:
                continue
            runs = {split: [r for r in records if (r["w1"], r["w2"]) == cell and r["split"] == split] for split in SPLITS}
            stat = lambda xs: f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.3f}"  # noqa: E731
            row = [cell_name(cell, labels[cell]), str(len(runs["seen"])), stat([r["exact"] for r in runs["seen"]]),
                   stat([r["exact"] for r in runs["withheld"]]),
                   f"{statistics.mean(r['colour_named'] for r in runs['withheld']):.2f}"]
            for split in SPLITS:
                t = paired_test(records, split, cell) if cell != BASELINE else None
                row.append("-" if not t or not t["pairs"] else
                           f"{t['mean_difference']:+.3f}, {t['cell_better']}/{t['pairs']} better, p = {t['sign_test_p']:.2g}")
            lines.append("| " + " | ".join(row) + " |")
            if cell == BASELINE:
                baselines_shown.add(seeds)
    return "\n".join(lines)


def commit_of_this_checkout(smoke: bool) -> str:
    """HEAD's short hash, refused when tracked files differ from it: the records name the code that ran."""
    here = Path(__file__).parent
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=here).stdout.strip()
    if dirty and not smoke:
        sys.exit(f"error: tracked files differ from HEAD ({dirty.splitlines()[0].strip()} ...); "
                 "commit or stash them so the records name the code that ran")
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=here).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 500])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    ap.add_argument("--smoke", action="store_true", help="a few steps and images: checks the script, not the claim")
    ap.add_argument("--cells", nargs="+", default=["0,0", "10,100"],
                    help="(w1, w2) cells to train, as w1,w2; (0,0) is the baseline every other cell is tested against")
    ap.add_argument("--align-loss", default=DemoConfig().recipe.align_loss, choices=("mse", "centred", "contrastive"),
                    help="stage 1's L_align of every cell but the baseline (train-adapter --align-loss)")
    ap.add_argument("--pformer-w-contrast", type=float, default=1.0,
                    help="the P-Former's contrastive weight (its own run and prompt cache when not 1)")
    ap.add_argument("--name", default="reproduce", help="results file: bench/results/<name>.json")
    ap.add_argument("--table", action="store_true", help="print README's table from bench/results/<name>.json")
    ap.add_argument("--levers", action="store_true", help="print README's lever table (every result file, 50 pairs)")
    a = ap.parse_args()
    if a.levers:
        print(levers_table())
        return
    if a.table:
        print(markdown_table(read_json(Path(__file__).parent / "results" / f"{a.name}.json")))
        return
    commit = commit_of_this_checkout(a.smoke)  # at the start: the study runs for over an hour
    cells = [tuple(float(w) for w in cell.split(",")) for cell in a.cells]
    torch.use_deterministic_algorithms(True)
    c = SMOKE if a.smoke else DemoConfig()
    test_images = 24 if a.smoke else TEST_IMAGES
    root = default_cache_root() / "runs" / ("bench-reproduce-smoke" if a.smoke else "bench-reproduce")
    records, spreads = [], {}
    for size in a.sizes:
        data, features = prepare(root, size, test_images)
        pformer = pformer_for_every_combination(root, data, c, a.pformer_w_contrast)
        prompts = root / "prompts" / f"withheld-{size}{contrast_suffix(a.pformer_w_contrast)}"
        build_prompts(BuildPromptsConfig(pformer=str(pformer), captions=[str(data / "captions_train.json")],
                                         out=str(prompts)))
        spreads[size] = reference_spread(prompts)
        for seed in a.seeds:
            cs = replace(c, seed=seed)
            for w1, w2 in cells:
                baseline = (w1, w2) == BASELINE  # never aligns: its P-Former and L_align's form do not matter
                name = variant_name(w1, w2, a.align_loss, a.pformer_w_contrast)
                align, contrast = ("mse", 1.0) if baseline else (a.align_loss, a.pformer_w_contrast)
                recipe = replace(cs.recipe, align_loss=a.align_loss)
                _, s2 = train_cell(recipe, name, w1, w2, features, prompts, [str(data / "captions_train.json")],
                                   root / f"n{size}-seed{seed}-{settings_digest(recipe)}", seed)
                for split in SPLITS:
                    records.append({"w1": w1, "w2": w2, "align_loss": align, "pformer_w_contrast": contrast,
                                    "paired_images": size, "split": split, "seed": seed,
                                    **score(s2, features, data, cs, split)})
                    print(records[-1], flush=True)
    for r in records:
        r["commit"] = commit
    result = {"commit": commit, "command": "python bench/reproduce.py " + " ".join(sys.argv[1:]), "records": records,
              "summary": summarise(records), "reference_spread_of_rms": spreads}
    if a.smoke:  # checks the script, not the claim: nothing goes to bench/results
        print(result)
    else:
        write_result(a.name, result)


if __name__ == "__main__":
    main()
