"""The ceiling of alignment alone: how many test captions the demo's P-Former's own reference
prompts let the frozen LLM write back exactly (greedy, 100 easy-VQA test captions), by its settings.

    python bench/pformer_ceiling.py --steps 200 --lr 3e-4 --max-grad-norm 1.0

Trains (or reuses) the demo's P-Former with those settings (blitext.recipes.demo.prepare_caches, so
the folders are the demo's), builds its prompt cache and scores the ceiling. Appends one record per
setting to bench/results/pformer_ceiling.json, with the prompt cache's path for bench/align_alone.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine  # noqa: E402

from blitext.config import git_commit  # noqa: E402
from blitext.recipes.demo import DemoConfig, prepare_caches, reference_ceiling  # noqa: E402
from blitext.recipes.recipe import Recipe  # noqa: E402

KEYS = ("pformer_steps", "pformer_lr", "pformer_max_grad_norm")  # the P-Former is seed 42's, as the demo's


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=Recipe.pformer_steps)
    ap.add_argument("--lr", type=float, default=Recipe.pformer_lr)
    ap.add_argument("--max-grad-norm", type=float, default=Recipe.pformer_max_grad_norm, help="0: no clipping")
    a = ap.parse_args()
    recipe = replace(Recipe(), pformer_steps=a.steps, pformer_lr=a.lr, pformer_max_grad_norm=a.max_grad_norm)
    c = replace(DemoConfig(), recipe=recipe)
    started = time.perf_counter()
    data, _, prompts = prepare_caches(c)
    seconds = round(time.perf_counter() - started)
    ceiling = reference_ceiling(data, prompts, c)
    record = {**{k: getattr(recipe, k) for k in KEYS}, "ceiling_exact": ceiling["exact_match"],
              "examples": ceiling["examples"], "prompts": str(prompts), "seconds_to_prompts": seconds,
              "commit": git_commit(), "machine": machine()}
    print(json.dumps(record))
    path = RESULTS / "pformer_ceiling.json"
    records = json.loads(path.read_text())["records"] if path.is_file() else []
    records = [r for r in records if any(r[k] != record[k] for k in KEYS)]
    path.write_text(json.dumps({"command": "python bench/pformer_ceiling.py ...", "records": [*records, record]},
                               indent=1) + "\n")


if __name__ == "__main__":
    main()
