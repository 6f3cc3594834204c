"""Peak memory and step time of the trainers' memory levers, each on and off, in one run.

    python bench/memory_levers.py [--batch-size 32] [--n-prompt 32] [--steps 8]

The workload is P-Former training on the bundled models (MiniLM text encoder, SmolLM2-135M frozen
LLM) and the demo's compositional sentences: like stage 2, it backpropagates through the frozen
LLM to the prompts, which is what the levers are for. Each setting trains in a fresh process
(`--child`), which reports its own peak resident memory (ru_maxrss) and the median step time over
the steps after the first two; a process that only loads the models gives the floor, so
"training memory" = peak - floor. CPU only here (process RSS); bench/gpu.sh reruns it on a GPU when
one is lent. Ratios within one run are the result; absolute seconds depend on the machine's load.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

SETTINGS = {  # name -> PFormerConfig overrides
    "baseline (fp32)": {},
    "--grad-checkpointing": {"grad_checkpointing": True},
    "--accum-steps 4": {"accum_steps": 4},
    "--precision bf16": {"precision": "bf16"},
    "all three": {"grad_checkpointing": True, "accum_steps": 4, "precision": "bf16"},
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(spec: dict) -> dict:
    """Runs in its own process: train (or only load, for the floor) and report."""
    from blitext.data.compose import compositional_captions
    from blitext.pformer.train import PFormerConfig, train_pformer
    from blitext.training import read_metrics

    if spec.get("floor"):
        from blitext.models.loading import load_llm, load_text_encoder
        from blitext.models.pformer import PFormer
        from blitext.models.registry import DEFAULT_LLM, DEFAULT_TEXT_ENCODER

        llm, enc = load_llm(DEFAULT_LLM), load_text_encoder(DEFAULT_TEXT_ENCODER)
        PFormer(enc.model, llm.width, spec["n_prompt"], 256, 0.07)
        return {"peak_rss_mb": round(peak_rss_mb(), 1)}
    work = Path(spec["work"])
    text = work / "text.txt"
    text.write_text("\n".join(compositional_captions()) + "\n")
    out = work / "run"
    train_pformer(PFormerConfig(text=[str(text)], out=str(out), n_prompt=spec["n_prompt"], batch_size=spec["batch_size"],
                                max_steps=spec["steps"], warmup_steps=1, log_every=1, sample_every=10**6, heldout=8,
                                save_every=10**6, device="cpu", **spec["overrides"]))
    lines = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    seconds = [spec["batch_size"] / m["sentences_per_s"] for m in lines[2:]]
    return {"peak_rss_mb": round(peak_rss_mb(), 1), "step_seconds_median": round(statistics.median(seconds), 3),
            "step_seconds_all": [round(s, 3) for s in seconds], "lm_loss_first": round(lines[0]["lm"], 4)}


def run_child(spec: dict) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if done.returncode:
        sys.exit(f"error: the {spec.get('name', 'floor')} process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    floor = run_child({"floor": True, "n_prompt": a.n_prompt})["peak_rss_mb"]
    results = {}
    for name, overrides in SETTINGS.items():
        with tempfile.TemporaryDirectory() as work:
            r = run_child({"name": name, "work": work, "n_prompt": a.n_prompt, "batch_size": a.batch_size,
                           "steps": a.steps, "overrides": overrides})
        r["training_mb"] = round(r["peak_rss_mb"] - floor, 1)
        results[name] = r
        print(name, r, flush=True)
    base = results["baseline (fp32)"]
    for r in results.values():
        r["training_mb_vs_baseline"] = round(r["training_mb"] / base["training_mb"], 3)
        r["step_time_vs_baseline"] = round(r["step_seconds_median"] / base["step_seconds_median"], 3)
    write_result("memory_levers", {
        "command": "python bench/memory_levers.py " + " ".join(sys.argv[1:]),
        "workload": f"P-Former training, batch {a.batch_size}, {a.n_prompt} prompts, SmolLM2-135M frozen, CPU",
        "floor_mb": floor, "settings": results,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=Path(__file__).parent).stdout.strip()})


if __name__ == "__main__":
    main()
