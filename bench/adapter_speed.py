"""Adaptor training speed on the embedded default (issue 4's goals), on this machine.

    python bench/adapter_speed.py [--images 256] [--steps 8] [--rounds 2]

1. Stage-1 pairs/s reading cached features, divided by `--online` (the encoder runs on the
   decoded images inside the loop, the reference code's way) on the same images, seed and
   batches. Rounds alternate cached/online so drift of this shared machine hits both; the
   median step of each is used. Goal: >= 3 with the bundled EfficientNet-Lite0.
2. The share of a cached step spent waiting for data (reads run ahead in a thread). Goal: < 5%.
3. Stage-2 model FLOP utilisation: FLOPs of one step (torch.utils.flop_counter) / its seconds /
   this machine's fp32 matmul peak measured just before, median over steps (as pformer_speed).

Stage 1 runs here without reference prompts (--w-align 0): L_align is one Linear and an MSE,
nothing next to the Q-Former passes.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402
from pformer_speed import matmul_peak  # noqa: E402

from blitext.adapter.image import AdapterConfig, AdapterLoop, _setup, train_adapter  # noqa: E402
from blitext.data.prepare import prepare_dataset  # noqa: E402
from blitext.distributed import dist_info  # noqa: E402
from blitext.features.image import ExtractConfig, extract_features  # noqa: E402
from blitext.training import adamw, read_metrics  # noqa: E402

ROOT = Path(__file__).parent.parent


def step_rates(run: Path, skip: int = 2) -> tuple[list[float], list[float]]:
    """(pairs/s, data-wait share) of every step after the first `skip` (warm-up)."""
    lines = [m for m in read_metrics(run / "metrics.jsonl") if "pairs_per_s" in m][skip:]
    return [m["pairs_per_s"] for m in lines], [m["data_wait"] for m in lines]


def stage1_ratio(work: Path, data: Path, features: Path, args) -> dict:
    base = AdapterConfig(stage=1, features=str(features), captions=[str(data / "captions_train.json")], w_align=0.0,
                         n_prompt=8, batch_size=args.batch_size, max_steps=args.steps, warmup_steps=1, log_every=1,
                         save_every=10_000, device="cpu")
    cached, online, waits = [], [], []
    for r in range(args.rounds):
        for mode in ("cached", "online"):
            run = work / f"{mode}-{r}"
            config = replace(base, out=str(run)) if mode == "cached" else replace(
                base, out=str(run), online=True, features=None, vision_encoder="efficientnet-lite0")
            train_adapter(config)
            rates, wait = step_rates(run)
            (cached if mode == "cached" else online).extend(rates)
            if mode == "cached":
                waits.extend(wait)
    c, o = statistics.median(cached), statistics.median(online)
    return {"stage1_batch": args.batch_size, "stage1_cached_pairs_per_s": round(c, 2),
            "stage1_online_pairs_per_s": round(o, 2), "cached_vs_online": round(c / o, 2), "cached_vs_online_goal": ">= 3",
            "cached_pairs_per_s_all": [round(x, 2) for x in cached], "online_pairs_per_s_all": [round(x, 2) for x in online],
            "data_wait_share_median": round(statistics.median(waits), 4), "data_wait_share_max": round(max(waits), 4),
            "data_wait_goal": "< 0.05"}


def stage2_mfu(data: Path, features: Path, args) -> dict:
    config = AdapterConfig(stage=2, features=str(features), captions=[str(data / "captions_train.json")], w_align=0.0,
                           n_prompt=8, batch_size=args.batch_size, max_steps=100, warmup_steps=1, device="cpu")
    setup = _setup(config, "cpu")
    model = setup.model
    model.train_only(2, False)
    loop = AdapterLoop(config, model, setup, "cpu", dist_info(), None, logging.getLogger("bench"))
    loop.optimizer = adamw(model.parameters(), config.lr, config.weight_decay)
    batch = loop.load(0)
    loop.train_step(0, 100, batch)  # warm-up
    with FlopCounterMode(display=False) as counter:
        loop.train_step(1, 100, batch)
    flops = counter.get_total_flops()
    peaks, times = [], []
    for s in range(2, 2 + args.steps):
        peaks.append(matmul_peak(repeats=3))
        t = time.perf_counter()
        loop.train_step(s, 100, loop.load(s))
        times.append(time.perf_counter() - t)
    mfus = sorted(flops / t / p for t, p in zip(times, peaks))
    return {"stage2_batch": args.batch_size, "stage2_step_flops": flops,
            "stage2_step_seconds_median": round(statistics.median(times), 3),
            "stage2_pairs_per_s": round(args.batch_size / statistics.median(times), 2),
            "stage2_mfu": round(mfus[len(mfus) // 2], 3), "stage2_mfu_per_step": [round(m, 3) for m in mfus],
            "matmul_peak_gflops_median": round(statistics.median(peaks) / 1e9, 1), "llm": setup.llm.fingerprint}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT / "cache") as tmp:
        work = Path(tmp)
        data = prepare_dataset("easy-vqa", out_root=work / "data", limit=args.images)
        features = work / "features"
        extract_features(ExtractConfig(data=str(data), out=str(features)))
        result = {"command": f"python bench/adapter_speed.py --images {args.images} --batch-size {args.batch_size} "
                             f"--steps {args.steps} --rounds {args.rounds}",
                  **stage1_ratio(work / "runs", data, features, args), **stage2_mfu(data, features, args)}
    write_result("adapter_speed", result)


if __name__ == "__main__":
    main()
