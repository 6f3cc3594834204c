"""The paper's claim where the embedded default can show it: language learnt from text alone helps
when image-text pairs are scarce.

    python bench/reproduce.py [--sizes 50 100 200 500] [--seeds 42 1 2] [--smoke]
    python bench/reproduce.py --table      # README's table from bench/results/reproduce.json

easy-VQA is prepared with colour x shape combinations withheld from the paired train images
(`data prepare easy-vqa --withhold default`: 6 of 24), while the P-Former's text holds every
combination (captions_all_combinations.txt plus the demo's compositional sentences). For each
paired-data size and seed, Table 4's cells (0, 0) and (10, 100) train with the demo's recipe
(blitext.recipes.demo.train_variant) and caption the same 500 test images, scored apart on the seen and
the withheld combinations (greedy exact match and CIDEr). One record per run and split goes to
bench/results/reproduce.json (w1, w2, paired_images, split, seed, exact, cider, commit); the
summary holds mean and std per cell and a paired sign test across (size, seed) per split.
Every finished phase under <cache>/runs/bench-reproduce is reused.
"""
from __future__ import annotations

import argparse
import math
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
from blitext.data.compose import compositional_captions  # noqa: E402
from blitext.data.easy_vqa import ALL_CAPTIONS_FILE  # noqa: E402
from blitext.data.prepare import prepare_dataset  # noqa: E402
from blitext.recipes.demo import SMOKE, VARIANTS, DemoConfig, train_once, train_variant  # noqa: E402
from blitext.evaluation.evaluate import EvalConfig, eval_caption  # noqa: E402
from blitext.features.image import ExtractConfig, extract_features  # noqa: E402
from blitext.pformer.train import PFormerConfig, train_pformer  # noqa: E402
from blitext.pformer.prompts import BuildPromptsConfig, build_prompts  # noqa: E402

SPLITS = ("seen", "withheld")
TEST_IMAGES = 500


def prepare(root: Path, size: int, test_images: int) -> tuple[Path, Path]:
    data = prepare_dataset("easy-vqa", out_root=root / "data" / f"withheld-{size}", limit=size,
                           withhold=("default",), test_limit=test_images)
    features = root / "features" / f"withheld-{size}"
    extract_features(ExtractConfig(data=str(data), out=str(features)))
    return data, features


def pformer_for_every_combination(root: Path, data: Path, c: DemoConfig) -> Path:
    """One P-Former for every size: its text is every combination, never the paired captions alone."""
    text = root / "data" / "pformer-text.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text((data / ALL_CAPTIONS_FILE).read_text() + "\n".join(compositional_captions()) + "\n")
    run = root / "pformer" / f"{c.n_prompt}x{c.pformer_steps}"
    train_once(run, lambda resume: train_pformer(PFormerConfig(
        text=[str(text)], out=str(run), n_prompt=c.n_prompt, batch_size=16, max_steps=c.pformer_steps,
        warmup_steps=max(1, c.pformer_steps // 7), sample_every=max(1, c.pformer_steps // 2), save_every=100,
        heldout=32, seed=42, resume=resume)))
    return run / "final"


def score(s2: Path, features: Path, data: Path, c: DemoConfig, split: str) -> dict:
    out = s2 / "eval" / f"caption-{split}"
    if not (out / "metrics.json").is_file():
        eval_caption(EvalConfig(adapter=str(s2), features=str(features), data=str(data / f"captions_test_{split}.json"),
                                out=str(out), prompt="", num_beams=1, min_new_tokens=1, max_new_tokens=12))
    metrics = read_json(out / "metrics.json")["metrics"]
    return {"exact": metrics["exact_match"], "cider": metrics["CIDEr"]}


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test (ties dropped): P(a split at least this uneven | no effect)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = max(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n)


def summarise(records: list[dict]) -> dict:
    cells, tests = {}, {}
    for r in records:
        cells.setdefault(f"{r['split']} n={r['paired_images']} ({r['w1']:g},{r['w2']:g})", []).append(r["exact"])
    for split in SPLITS:
        pairs = {}
        for r in (r for r in records if r["split"] == split):
            pairs.setdefault((r["paired_images"], r["seed"]), {})[(r["w1"], r["w2"])] = r["exact"]
        diffs = [v[VARIANTS["pformer"]] - v[VARIANTS["baseline"]] for v in pairs.values() if len(v) == 2]
        wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
        tests[split] = {"pairs": len(diffs), "pformer_better": wins, "baseline_better": losses,
                        "ties": len(diffs) - wins - losses, "sign_test_p": sign_test(wins, losses),
                        "mean_difference": statistics.mean(diffs) if diffs else None}
    return {"cells": {k: {"mean": statistics.mean(v), "std": statistics.pstdev(v), "runs": len(v)}
                      for k, v in cells.items()}, "paired_sign_test": tests}


def markdown_table(result: dict) -> str:
    """README's table from a reproduce.json: exact match mean +- sample std over seeds (CIDEr mean
    beside it) per paired-data size and split, then the paired sign test per split."""
    def cell(size: int, split: str, w: tuple[float, float]) -> str:
        runs = [r for r in result["records"] if (r["paired_images"], r["split"], (r["w1"], r["w2"])) == (size, split, w)]
        if not runs:
            return "-"
        exact, cider = [r["exact"] for r in runs], [r["cider"] for r in runs]
        spread = statistics.stdev(exact) if len(exact) > 1 else 0.0
        return f"{statistics.mean(exact):.3f} ± {spread:.3f} ({statistics.mean(cider):.2f})"
    sizes = sorted({r["paired_images"] for r in result["records"]})
    seeds = sorted({r["seed"] for r in result["records"]})
    head = ["paired images"] + [f"{split}: {name} ({w1:g},{w2:g})" for split in SPLITS
                                for name, (w1, w2) in VARIANTS.items()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size in sizes:
        lines.append("| " + " | ".join([str(size)] + [cell(size, split, w) for split in SPLITS
                                                      for w in VARIANTS.values()]) + " |")
    lines.append("")
    lines.append(f"Exact match, mean ± sample std over seeds {', '.join(map(str, seeds))} (CIDEr mean in brackets); "
                 f"commit {result['commit']}.")
    for split, t in result["summary"]["paired_sign_test"].items():
        lines.append(f"- {split}: P-Former better in {t['pformer_better']} of {t['pairs']} (size, seed) pairs, "
                     f"baseline in {t['baseline_better']}, {t['ties']} ties; mean difference "
                     f"{t['mean_difference']:+.3f}; two-sided sign test p = {t['sign_test_p']:.3g}")
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
    ap.add_argument("--table", action="store_true", help="print README's table from bench/results/reproduce.json")
    a = ap.parse_args()
    if a.table:
        print(markdown_table(read_json(Path(__file__).parent / "results" / "reproduce.json")))
        return
    commit = commit_of_this_checkout(a.smoke)  # at the start: the study runs for over an hour
    torch.use_deterministic_algorithms(True)
    c = SMOKE if a.smoke else DemoConfig()
    test_images = 24 if a.smoke else TEST_IMAGES
    root = default_cache_root() / "runs" / ("bench-reproduce-smoke" if a.smoke else "bench-reproduce")
    records = []
    for size in a.sizes:
        data, features = prepare(root, size, test_images)
        pformer = pformer_for_every_combination(root, data, c)
        prompts = root / "prompts" / f"withheld-{size}"
        build_prompts(BuildPromptsConfig(pformer=str(pformer), captions=[str(data / "captions_train.json")],
                                         out=str(prompts)))
        for seed in a.seeds:
            cs = replace(c, seed=seed)
            for name, (w1, w2) in VARIANTS.items():
                _, s2 = train_variant(cs, name, w1, w2, features, prompts, data, root / f"n{size}-seed{seed}")
                for split in SPLITS:
                    records.append({"w1": w1, "w2": w2, "paired_images": size, "split": split, "seed": seed,
                                    **score(s2, features, data, cs, split)})
                    print(records[-1], flush=True)
    for r in records:
        r["commit"] = commit
    result = {"commit": commit, "command": "python bench/reproduce.py " + " ".join(sys.argv[1:]), "records": records,
              "summary": summarise(records)}
    if a.smoke:  # checks the script, not the claim: nothing goes to bench/results
        print(result)
    else:
        write_result("reproduce", result)


if __name__ == "__main__":
    main()
