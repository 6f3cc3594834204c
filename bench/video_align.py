"""How long the video demo's alignment phase must be before L_align has taught anything.

    blitext demo --video            # once: its caches (features, P-Former prompts) are reused
    python bench/video_align.py [--align 60 600] [--seeds 42 1 2] [--no-itg] [--fresh]

For each alignment length: an alignment-only run, whose prompts (eval mode, every train clip)
are scored by MSE against the reference prompts next to the MSE of the mean reference prompt
(a constant that knows nothing of the clip); then the demo's P-Former variant with that
alignment phase followed by the demo's LM phase, captioning the demo's test clips. The ITG-only
baseline (LM phase alone) runs once for comparison. Everything else is demo --video's default
configuration; every variant runs once per seed (42 is the demo's), since one run of this size
is chaotic: float noise of 1e-5 at the end of the alignment phase moved one run's CIDEr from
1.2 to 4.2. Finished runs in <cache>/runs/bench-video-align are reused unless --fresh.
Writes bench/results/video_align.json.
"""
from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

from blitext.cache import FeatureCache  # noqa: E402
from blitext.config import default_cache_root, git_commit  # noqa: E402
from blitext.data.pairs import read_pairs  # noqa: E402
from blitext.recipes.demo_video import VideoDemoConfig, attribute_accuracy, caption_test_clips, data_tag, pformer_run  # noqa: E402
from blitext.models.adapter_checkpoint import load_adapter  # noqa: E402
from blitext.pformer.prompts import PromptCache  # noqa: E402
from blitext.adapter.video import VideoAdapterConfig, train_video_adapter  # noqa: E402


def demo_caches(c: VideoDemoConfig) -> tuple[Path, Path, Path]:
    root, tag = default_cache_root(), data_tag(c)
    features = root / "features" / f"{tag}__efficientnet-lite0-video-{c.segment_frames}f"
    prompts = root / "prompts" / f"{tag}__{pformer_run(c).name}"
    data = [p.parent for p in (root / "data" / tag).glob("**/captions_train.json")]
    if not (features.is_dir() and prompts.is_dir() and data):
        sys.exit(f"no demo --video caches under {root}: run `blitext demo --video` first")
    return features, prompts, data[0]


def train(c: VideoDemoConfig, features: Path, prompts: Path, data: Path, out: Path, w_align: float, align: int,
          lm: int, fresh: bool) -> Path:
    if (out / "final").is_dir() and not fresh:
        return out
    shutil.rmtree(out, ignore_errors=True)
    train_video_adapter(VideoAdapterConfig(
        features=str(features), prompts=str(prompts), captions=[str(data / "captions_train.json")], w_align=w_align,
        out=str(out), n_prompt=c.recipe.n_prompt, max_steps=lm or None, epochs=0, align_steps=align, batch_size=c.batch_size,
        lr=c.lr, llm_proj_lr_scale=c.llm_proj_lr_scale, max_grad_norm=c.max_grad_norm,
        warmup_steps=max(1, c.lm_steps // 10), seed=c.seed, save_every=100000, log_every=1, device="cpu"))
    return out


@torch.no_grad()
def alignment_mse(run: Path, features: Path, prompts: Path) -> dict[str, float]:
    """MSE of the run's prompts (eval mode) and of the mean reference prompt, over every train clip."""
    adapter = load_adapter(run)
    pairs = read_pairs(adapter.state["config"]["captions"], None, lambda video_id: True)
    feats, mask = FeatureCache(features).get_batch(pairs.image_ids)
    reference = PromptCache(prompts).get_batch(pairs.keys)  # (N, S, d_llm)
    got = adapter.model.prompts(feats.float(), mask)
    mean = reference.mean(0, keepdim=True).expand_as(reference)
    spread = lambda x: float((x - x.mean(0)).pow(2).mean().sqrt())  # noqa: E731
    return {"mse": float(((got - reference) ** 2).mean()), "mean_prompt_mse": float(((mean - reference) ** 2).mean()),
            "spread": spread(got), "reference_spread": spread(reference)}


def captions(run: Path, features: Path, data: Path, c: VideoDemoConfig) -> dict:
    metrics = caption_test_clips(run, features, data, c)
    return {**{k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)},
            **{k: round(v, 3) for k, v in attribute_accuracy(run, data).items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--align", type=int, nargs="+", default=[60, 600])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--no-itg", action="store_true", help="skip the ITG-only baseline")
    parser.add_argument("--fresh", action="store_true", help="retrain runs found in the work folder")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        c = replace(VideoDemoConfig(), seed=seed)
        features, prompts, data = demo_caches(c)
        work = default_cache_root() / "runs" / "bench-video-align" / f"seed{seed}"
        run = functools.partial(train, c, features, prompts, data, fresh=args.fresh)
        for align in args.align:
            only = run(work / f"align-only-{align}", 100.0, align, 0)
            mse = alignment_mse(only, features, prompts)
            full = run(work / f"pformer-align{align}-lm{c.lm_steps}", 100.0, align, c.lm_steps)
            rows.append({"variant": f"P-Former: align {align}, LM {c.lm_steps}", "seed": seed, "align_steps": align,
                         **{f"align_only_{k}": round(v, 7) for k, v in mse.items()},
                         **captions(full, features, data, c)})
            print(rows[-1], flush=True)
        if not args.no_itg:
            itg = run(work / f"itg-only-lm{c.lm_steps}", 0.0, 0, c.lm_steps)
            rows.append({"variant": f"ITG only: LM {c.lm_steps}", "seed": seed, "align_steps": 0,
                         **captions(itg, features, data, c)})
            print(rows[-1], flush=True)
    c = VideoDemoConfig()
    write_result("video_align", {"command": "python bench/video_align.py " + " ".join(sys.argv[1:]), "commit": git_commit(),
                                 "pformer": pformer_run(c).name,
                                 "lm_steps": c.lm_steps, "batch_size": c.batch_size, "lr": c.lr,
                                 "llm_proj_lr_scale": c.llm_proj_lr_scale, "caption_clips": c.caption_clips,
                                 "summary": summarise(rows), "rows": rows})


def summarise(rows: list[dict]) -> dict:
    """Per variant: mean, min and max over seeds of CIDEr and the attribute accuracies."""
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        out[variant] = {k: {"mean": round(statistics.mean(r[k] for r in mine), 3),
                            "min": min(r[k] for r in mine), "max": max(r[k] for r in mine)}
                        for k in ("CIDEr", "Bleu_4", "color_accuracy", "shape_accuracy", "direction_accuracy")}
        out[variant]["seeds"] = [r["seed"] for r in mine]
    return out


if __name__ == "__main__":
    main()
