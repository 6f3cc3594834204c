"""Stage-2 learning rates at a CPU-sized batch: which settings make the frozen-LLM loss fall.

    python bench/stage2_lr.py [--images 64] [--steps 40]

The paper trains stage 2 at lr 1e-4 with batch 1024; the demo runs batch 8 for ~100 steps.
On the same caches, the same stage-1 run and the same seed, each variant trains stage 2 for
`--steps` steps (cosine schedule, 2 warm-up steps) and reports the LM loss of its first and
last 5 steps. Variants: one rate for all (the paper's way), llm_proj at a higher rate
(`--llm-proj-lr-scale`), gradient clipping (`--max-grad-norm`), and both; the chosen one
with w2 = 0 (the baseline) too. Writes bench/results/stage2_lr.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

from blitext.adapter.image import AdapterConfig, train_adapter  # noqa: E402
from blitext.data.prepare import prepare_dataset  # noqa: E402
from blitext.features.image import ExtractConfig, extract_features  # noqa: E402
from blitext.pformer.train import PFormerConfig, train_pformer  # noqa: E402
from blitext.pformer.prompts import BuildPromptsConfig, build_prompts  # noqa: E402
from blitext.training import read_metrics  # noqa: E402

# (name, lr, llm_proj_lr_scale, max_grad_norm, w2)
VARIANTS = [
    ("one rate 5e-5", 5e-5, 1.0, None, 100.0),
    ("llm_proj x20", 5e-5, 20.0, None, 100.0),
    ("clip 1.0", 5e-5, 1.0, 1.0, 100.0),
    ("llm_proj x20 + clip 1.0 (demo)", 5e-5, 20.0, 1.0, 100.0),
    ("llm_proj x20 + clip 1.0, w2 = 0", 5e-5, 20.0, 1.0, 0.0),
    ("lr 1e-4, llm_proj x10 + clip 1.0", 1e-4, 10.0, 1.0, 100.0),
]


def caches(work: Path, images: int) -> tuple[Path, Path, Path]:
    """easy-VQA features, a short P-Former's reference prompts, and one stage-1 run (w1 = 10)."""
    data = prepare_dataset("easy-vqa", out_root=work / "data", limit=images)
    features, prompts, s1 = work / "features", work / "prompts", work / "stage1"
    extract_features(ExtractConfig(data=str(data), out=str(features)))
    train_pformer(PFormerConfig(text=[str(data / "captions_train.json")], out=str(work / "pformer"), n_prompt=4,
                                batch_size=8, max_steps=3, warmup_steps=1, heldout=4, sample_every=1000))
    build_prompts(BuildPromptsConfig(pformer=str(work / "pformer"), captions=[str(data / "captions_train.json")],
                                     out=str(prompts)))
    train_adapter(AdapterConfig(stage=1, features=str(features), prompts=str(prompts), out=str(s1), max_steps=24,
                                warmup_steps=2, batch_size=16, lr=1e-3, log_every=1, save_every=1000))
    return features, prompts, s1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        features, prompts, s1 = caches(work, args.images)
        for name, lr, scale, clip, w2 in VARIANTS:
            run = work / f"stage2-{len(rows)}"
            train_adapter(AdapterConfig(stage=2, features=str(features), prompts=str(prompts), init=str(s1),
                                        out=str(run), max_steps=args.steps, warmup_steps=2, batch_size=8, lr=lr,
                                        llm_proj_lr_scale=scale, max_grad_norm=clip, w_align=w2, log_every=1,
                                        save_every=1000))
            lm = [m["lm"] for m in read_metrics(run / "metrics.jsonl")]
            rows.append({"variant": name, "lr": lr, "llm_proj_lr_scale": scale, "max_grad_norm": clip, "w2": w2,
                         "lm_first5": round(statistics.mean(lm[:5]), 3), "lm_last5": round(statistics.mean(lm[-5:]), 3),
                         "lm_curve": [round(v, 2) for v in lm]})
            print(f"{name}: LM {rows[-1]['lm_first5']} -> {rows[-1]['lm_last5']}", flush=True)
    write_result("stage2_lr", {"command": "python bench/stage2_lr.py " + " ".join(sys.argv[1:]),
                               "images": args.images, "steps": args.steps, "batch_size": 8, "variants": rows})


if __name__ == "__main__":
    main()
