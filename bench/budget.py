"""Table 4's cells on the embedded recipe over seeds: captions from alignment alone, the budget curve
and each cell's cost (issue: the method made visible).

For each seed and cell (w1, w2), trains stage 1 (BLIP-2's ITC + ITM + ITG, + w1 x L_align) and
stage 2 (LM + w2 x L_align) with blitext.recipes.recipe, the demo's code and settings, on the demo's
caches (run `blitext demo` first, or this prepares them), then scores greedy captions of the test
images at stage-2 steps 0 (after stage 1: the LLM never ran), the recipe's snapshots and the end.
Also the ceiling: the P-Former's own reference prompts of the test captions, fed to the LLM.

    python bench/budget.py --seeds 42 1 2                 # -> bench/results/budget.json
    python bench/budget.py --seeds 42 1 2 --cells baseline pformer align-stage1 align-stage2 --name budget-grid
    python bench/budget.py --seeds 42 --set stage2_warmup_steps=50 --name budget-warmup50
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

from blitext.atomic import read_json  # noqa: E402
from blitext.config import git_commit  # noqa: E402
from blitext.loop import snapshots  # noqa: E402
from blitext.metrics.stats import paired_counts  # noqa: E402
from blitext.recipes.ablate_seeds import item_hits  # noqa: E402
from blitext.recipes import budget  # noqa: E402
from blitext.recipes.demo import LABELS, VARIANTS, DemoConfig, demo_work, prepare_caches  # noqa: E402
from blitext.recipes.recipe import Recipe, train_cell  # noqa: E402

# Table 4's grid: the demo's two cells (its folders at its seed) and the two that add L_align to one stage only
GRID = {"baseline": VARIANTS["baseline"], "pformer": VARIANTS["pformer"], "align-stage1": (10.0, 0.0),
        "align-stage2": (0.0, 100.0)}
GRID_LABELS = {**LABELS, "align-stage1": "stage-1 L_align (10, 0)", "align-stage2": "stage-2 L_align (0, 100)"}


def point_folders(s1: Path, s2: Path) -> dict[int, Path | None]:
    """{stage-2 step: the adaptor whose captions scored that curve point}; None at step 0 of a w1 = 0
    cell (its llm_proj never met the LLM: every caption counts as wrong, as budget.curve scores it)."""
    return {0: s1 if budget.stage1_aligned(s1) else None, **snapshots(s2), read_json(s2 / "final" / "state.json")["step"]: s2}


def paired_tests(folders: dict[str, list[dict[int, Path | None]]], data: Path, images: int,
                 base: str = "baseline") -> dict[str, dict[int, dict]]:
    """Each cell against `base` at every stage-2 step: per test image and seed, is its greedy caption
    exact in one cell and not the other (pooled over seeds), with the two-sided sign test."""
    name = budget.eval_name(data, images)

    def hits(seed_folders: list[dict[int, Path | None]], step: int) -> dict:
        out = {}
        for seed_index, by_step in enumerate(seed_folders):
            folder = by_step.get(step)
            found = item_hits(folder / "eval" / name) if folder else None
            out.update({(seed_index, i): bool(found and found[i]) for i in (found or base_ids)})
        return out

    base_ids = item_hits(folders[base][0][max(folders[base][0])] / "eval" / name).keys()
    steps = sorted(set.intersection(*(set(f) for runs in folders.values() for f in runs)))
    return {cell: {step: paired_counts(hits(runs, step), hits(folders[base], step)) for step in steps}
            for cell, runs in folders.items() if cell != base}


def stage1_owner(cell: str) -> str:
    """The first grid cell with this cell's w1: cells with the same w1 share its stage-1 run."""
    return next(name for name, (w1, _) in GRID.items() if w1 == GRID[cell][0])


def parse_set(items: list[str]) -> dict:
    kinds = {f.name: f.type for f in fields(Recipe)}
    out = {}
    for item in items:
        key, value = item.split("=", 1)
        if key not in kinds:
            raise SystemExit(f"--set {key}: not a Recipe field ({', '.join(kinds)})")
        default = getattr(Recipe(), key)
        out[key] = json.loads(value) if value[:1] in "[{" or default is None else type(default)(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    ap.add_argument("--cells", nargs="+", default=list(VARIANTS), choices=list(GRID),
                    help="Table 4's cells (default: the demo's two); cells with the same w1 share one stage 1")
    ap.add_argument("--set", nargs="*", default=[], help="Recipe overrides, e.g. stage1_steps=800")
    ap.add_argument("--images", type=int, default=100, help="test images captioned at each point")
    ap.add_argument("--name", default="budget")
    ap.add_argument("--stage1-only", action="store_true", help="captions from alignment alone: no stage 2")
    ap.add_argument("--stage1-from", type=Path, help="a demo run folder whose stage-1 runs these cells reuse "
                    "(for --set of stage-2 fields only; that folder's seed must be the only seed)")
    a = ap.parse_args()
    c = DemoConfig()
    c = replace(c, recipe=replace(c.recipe, **parse_set(a.set)))
    data, features, prompts = prepare_caches(c)
    curves, costs, labels, folders = {}, {}, {}, {}
    for cell in a.cells:
        w1, w2 = GRID[cell]
        labels[cell] = GRID_LABELS[cell]
        owner = stage1_owner(cell)
        if a.stage1_only and owner != cell:
            continue  # its stage 1 is the owner's
        for seed in a.seeds:  # the demo's own runs at its seed; the same folders' layout at the others
            cs = replace(c, seed=seed)
            if a.stage1_from and not (demo_work(cs) / f"{owner}-stage1").exists():
                shutil.copytree(a.stage1_from / f"{owner}-stage1", demo_work(cs) / f"{owner}-stage1")
            s1, s2 = train_cell(cs.recipe, cell, w1, w2, features, prompts, [str(data / "captions_train.json")],
                                demo_work(cs), seed, stage2=not a.stage1_only, stage1_of=owner)
            if a.stage1_only:
                curves.setdefault(cell, []).append([{"step": 0, **budget.caption_point(s1, features, data, a.images)}])
                continue
            curves.setdefault(cell, []).append(budget.curve(s1, s2, features, data, a.images))
            folders.setdefault(cell, []).append(point_folders(s1, s2))
            costs.setdefault(cell, []).append(budget.costs(s1, s2))
    summ = budget.summary(curves)
    line = budget.verdict(summ, labels)
    print(line)
    paired = paired_tests(folders, data, a.images) if "baseline" in folders and len(folders) > 1 else {}
    for cell, by_step in paired.items():
        print(f"{labels[cell]} against {labels['baseline']}, exact caption per test image and seed: " + "; ".join(
            f"step {step} +{t['wins']}/-{t['losses']} (p {t['sign_test_p']:.2g})" for step, t in by_step.items()))
    png = budget.plot_curves(curves, Path(__file__).parent / "results" / f"{a.name}.png", labels)
    write_result(a.name, {"commit": git_commit(), "command": " ".join(sys.argv), "seeds": a.seeds,
                          "recipe": asdict(c.recipe), "curves": curves, "costs": costs, "summary": summ,
                          "verdict": line, "plot": png.name, "images": a.images,
                          "paired_against_baseline": {cell: {str(k): v for k, v in by.items()} for cell, by in paired.items()},
                          "paired_note": "per test image and seed, pooled over seeds: wins = exact in the cell and "
                                         "not in BLIP-2 (0, 0) at the same seed and stage-2 step; two-sided exact "
                                         "sign test over wins and losses"})


if __name__ == "__main__":
    main()
