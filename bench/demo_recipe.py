"""What makes the image demo learn: its recipe over seeds, and the dropout that stopped it.

    blitext demo                       # once: the data, features, P-Former and prompts are reused
    python bench/demo_recipe.py [--seeds 42 1 2] [--ablation-seed 42] [--fresh]

Runs `blitext demo`'s two variants (baseline: stage 2 alone; P-Former: L_align alone, then the
LLM's loss + 100 L_align) with the demo's code at each seed (the adaptor's seed; the P-Former
is the demo's), then both again at one seed with the Q-Former's dropout at MiniLM's 0.1 (the
recipe before this bench). For each run: exact-match and CIDEr of greedy captions of the demo's
100 test images (the demo's own eval caption settings), and the frozen LLM's loss on 32 training
pairs with the adaptor in eval mode (as generate runs it) against train mode (dropout on).
The seed-42 rows are computed afresh, so they also check that the demo repeats: they must equal
the demo's own results.json to the last digit. Finished runs in <cache>/runs/bench-demo-recipe
are reused unless --fresh. Writes bench/results/demo_recipe.json.
"""
from __future__ import annotations

import argparse
import shutil
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
from blitext.data.pairs import read_pairs  # noqa: E402
from blitext.cache import FeatureCache  # noqa: E402
from blitext.recipes.demo import VARIANTS, DemoConfig, caption_eval, prepare_caches, settings_digest, train_variant  # noqa: E402
from blitext.evaluation.evaluate import eval_caption  # noqa: E402
from blitext.models.adapter_checkpoint import load_adapter  # noqa: E402
from blitext.models.loading import load_llm  # noqa: E402


def run_variant(c: DemoConfig, name: str, features: Path, prompts: Path, data: Path, root: Path, fresh: bool) -> dict:
    work = root / f"seed{c.seed}-dropout{c.dropout:g}-{settings_digest(c)}"
    if fresh:
        shutil.rmtree(work / f"{name}-stage1", ignore_errors=True)
        shutil.rmtree(work / f"{name}-stage2", ignore_errors=True)
    w1, w2 = VARIANTS[name]
    _, s2 = train_variant(c, name, w1, w2, features, prompts, data, work)
    out = s2 / "eval" / "caption-easy-vqa"
    if not (out / "metrics.json").is_file():
        eval_caption(caption_eval(s2, features, data, c, out))
    metrics = read_json(out / "metrics.json")["metrics"]
    return {"variant": name, "seed": c.seed, "dropout": c.dropout, "exact": metrics["exact_match"],
            "cider": metrics["CIDEr"], **train_vs_eval_loss(s2, features, data), "run": str(s2)}


@torch.no_grad()
def train_vs_eval_loss(s2: Path, features: Path, data: Path, n: int = 32) -> dict:
    """The frozen LLM's loss on the first n training pairs, the adaptor in eval mode and in train mode."""
    adapter = load_adapter(s2)
    llm = load_llm(adapter.llm_name)
    cache = FeatureCache(features)
    pairs = read_pairs([str(data / "captions_train.json")], None, lambda i: i in cache)
    rows = cache.get_batch(pairs.image_ids[:n])[0].float()
    tgt = llm.lm_batch(pairs.texts[:n], "\n", 10**6)
    losses = {}
    for mode in ("eval", "train"):
        adapter.model.train(mode == "train")
        torch.manual_seed(0)
        losses[f"{mode}_mode_loss"] = float(llm.lm_loss(adapter.model.prompts(rows), tgt))
    return losses


def summary(records: list[dict], dropout: float) -> dict:
    out = {}
    for name in VARIANTS:
        rows = [r for r in records if r["variant"] == name and r["dropout"] == dropout]
        for key in ("exact", "cider"):
            values = [r[key] for r in rows]
            out[f"{name}_{key}"] = {"mean": statistics.mean(values), "std": statistics.pstdev(values),
                                    "min": min(values), "max": max(values), "seeds": [r["seed"] for r in rows]}
    return out


def demo_repeats(records: list[dict], root: Path, c: DemoConfig) -> dict | None:
    """The bench's seed-`c.seed` rows against the demo's own results.json (same settings, computed apart)."""
    demo = root.parent / "demo"
    found = [p for p in demo.glob(f"*-{settings_digest(c)}/results.json")]
    if not found:
        return None
    results = read_json(found[0])
    return {name: {"demo": results[name]["caption-easy-vqa"]["exact_match"],
                   "bench": next(r["exact"] for r in records if r["variant"] == name and r["seed"] == c.seed
                                 and r["dropout"] == c.dropout)} for name in VARIANTS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    ap.add_argument("--ablation-seed", type=int, default=42, help="seed of the dropout-0.1 runs (none: -1)")
    ap.add_argument("--fresh", action="store_true")
    a = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    base = DemoConfig()
    data, features, prompts = prepare_caches(base)
    root = default_cache_root() / "runs" / "bench-demo-recipe"
    records = []
    for seed in a.seeds:
        for name in VARIANTS:
            records.append(run_variant(replace(base, seed=seed), name, features, prompts, data, root, a.fresh))
            print(records[-1], flush=True)
    if a.ablation_seed >= 0:
        for name in VARIANTS:
            c = replace(base, seed=a.ablation_seed, dropout=0.1)
            records.append(run_variant(c, name, features, prompts, data, root, a.fresh))
            print(records[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    write_result("demo_recipe", {"commit": commit, "command": "python bench/demo_recipe.py " + " ".join(sys.argv[1:]),
                                 "records": records, "summary": summary(records, base.dropout),
                                 "demo_repeats": demo_repeats(records, root, base)})


if __name__ == "__main__":
    main()
