"""Captions from alignment alone: L_align trained with no LLM step, then the LLM reads the prompts.

Trains the demo's Q-Former (blitext.recipes.recipe's shape) on L_align alone for N steps at batch
16 (train-adapter --stage 1 --align-steps N --max-steps 0, seed 42) against a prompt cache, then
captions 100 easy-VQA test images greedily through the frozen LLM (bench's budget.caption_point),
and probes what the prompts carry on 128 training pairs: their mean's distance from the
references' mean (in units of the references' between-caption variance), the MSE over that
variance, and how often an image's prompt is nearest (centred cosine) its own caption's
reference. Appends one record per setting to bench/results/align_alone.json.

    python bench/align_alone.py --lr 2e-4 --llm-proj-lr-scale 10 --steps 600 --align-loss contrastive \
        --contrast-weight 8 --prompts <cache>/prompts/<the demo's prompt cache>
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine  # noqa: E402

from blitext.adapter.image import AdapterConfig, train_adapter  # noqa: E402
from blitext.cache import FeatureCache  # noqa: E402
from blitext.config import default_cache_root, git_commit  # noqa: E402
from blitext.models.adapter_checkpoint import load_adapter  # noqa: E402
from blitext.pformer.prompts import PromptCache  # noqa: E402
from blitext.recipes import budget  # noqa: E402
from blitext.recipes.recipe import Recipe, adapter_base  # noqa: E402


@torch.no_grad()
def probe(run: Path, features: Path, prompts: Path, n: int = 128) -> dict:
    """What the adaptor's prompts carry on n training pairs, against their references."""
    adapter, cache, refs = load_adapter(run), FeatureCache(features), PromptCache(prompts)
    keys = refs.keys[:n]
    f, mask = cache.get_batch([k.split("#")[0] for k in keys])
    p, r = adapter.model.prompts(f.float(), mask), refs.get_batch(keys).float()
    spread = (r - r.mean(0)).pow(2).mean()
    pz = F.normalize((p - r.mean(0)).flatten(1), dim=-1)
    rz = F.normalize((r - r.mean(0)).flatten(1), dim=-1)
    same = torch.cdist(r.flatten(1), r.flatten(1), compute_mode="donot_use_mm_for_euclid_dist") == 0  # exact: duplicates
    q = adapter.model.query_output(f.float(), mask)
    qm = F.normalize(q.mean(0), dim=-1)
    return {"mean_error_over_spread": float((p.mean(0) - r.mean(0)).pow(2).mean() / spread),
            "mse_over_spread": float((p - r).pow(2).mean() / spread),
            "nearest_reference_is_own": float(same[torch.arange(len(p)), (pz @ rz.T).argmax(1)].float().mean()),
            "query_slot_cosine": float((qm @ qm.T)[~torch.eye(len(qm), dtype=torch.bool)].mean()),
            "prompt_spread_over_reference_spread": float(((p - p.mean(0)).pow(2).mean() / spread).sqrt())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--llm-proj-lr-scale", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--align-loss", default="contrastive", choices=("mse", "centred", "contrastive"))
    ap.add_argument("--contrast-weight", type=float, default=AdapterConfig.align_contrast_weight)
    ap.add_argument("--prompts", required=True, help="a prompt cache of the demo's train captions")
    ap.add_argument("--contrast-temp", type=float, default=0.05)
    ap.add_argument("--negatives", type=int, default=0)
    ap.add_argument("--max-grad-norm", type=float, default=None)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    root = default_cache_root()
    data, features = root / "data" / "easy-vqa-500" / "easy-vqa", root / "features" / "easy-vqa-500__efficientnet-lite0"
    prompts = Path(a.prompts)
    out = root / "runs" / "align-alone" / (f"{a.lr:g}-{a.llm_proj_lr_scale:g}-{a.steps}-{a.align_loss}-"
                                            f"{a.contrast_weight:g}-t{a.contrast_temp:g}-c{a.max_grad_norm}-n{a.negatives}-{a.seed}-"
                                            f"{prompts.name}")
    base = adapter_base(Recipe(), features, prompts, [str(data / "captions_train.json")], a.seed)
    started = time.perf_counter()
    if not (out / "final").is_dir():
        train_adapter(replace(base, stage=1, w_align=10.0, align_loss=a.align_loss,
                              align_contrast_weight=a.contrast_weight, align_contrast_temp=a.contrast_temp, align_negatives=a.negatives,
                              max_grad_norm=a.max_grad_norm, align_steps=a.steps, max_steps=0, lr=a.lr,
                              llm_proj_lr_scale=a.llm_proj_lr_scale, warmup_steps=max(1, a.steps // 10),
                              save_every=10**6, out=str(out)))
    record = {"lr": a.lr, "llm_proj_lr_scale": a.llm_proj_lr_scale, "steps": a.steps, "align_loss": a.align_loss,
              "contrast_weight": a.contrast_weight, "contrast_temp": a.contrast_temp, "negatives": a.negatives,
              "max_grad_norm": a.max_grad_norm, "seed": a.seed, "prompts": prompts.name,
              "captions": budget.caption_point(out, features, data, 100), **probe(out, features, prompts),
              "seconds": round(time.perf_counter() - started), "commit": git_commit(), "machine": machine()}
    print(json.dumps(record))
    path = RESULTS / "align_alone.json"
    records = json.loads(path.read_text())["records"] if path.is_file() else []
    same = ("lr", "llm_proj_lr_scale", "steps", "align_loss", "contrast_weight", "contrast_temp", "max_grad_norm",
            "negatives", "seed", "prompts")
    defaults = {"contrast_temp": 0.05, "max_grad_norm": None, "negatives": 0}  # records written before these were options
    records = [r for r in records if any(r.get(k, defaults.get(k)) != record[k] for k in same)]
    path.write_text(json.dumps({"command": "python bench/align_alone.py ...", "records": [*records, record]},
                               indent=1) + "\n")


if __name__ == "__main__":
    main()
