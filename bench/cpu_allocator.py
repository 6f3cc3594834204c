"""What keeping freed memory (blitext/allocator.py) changes on the CPU, measured side by side.

    PYTHONPATH=. python bench/cpu_allocator.py [--rounds 3] [--note ...]

Two workloads, each in a fresh process per measurement (malloc's settings are per process),
glibc's default and blitext's setting alternated round by round:
- `encoder`: the embedded image encoder's forward on a batch of 32 images at its input size
  (extract-features' work), per image;
- `llm_step`: the embedded LLM's forward and backward on 16 x 40 input embeddings (a stage-2
  step's LLM part), per step.
Each gives CPU time in user and kernel mode, wall time and peak RSS; the figure is the median
over rounds. Writes bench/results/cpu_allocator.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import git_commit, write_result  # noqa: E402

MEASURE = """
import json, os, resource, time, torch
if {kept}:
    from blitext.allocator import keep_freed_memory
    assert keep_freed_memory()
torch.set_num_threads({threads})
{setup}
work()  # warm-up: the first pass allocates in any case
t0, w0 = os.times(), time.perf_counter()
for _ in range({repeats}):
    work()
t1, w1 = os.times(), time.perf_counter()
n = {repeats} * {items}
print(json.dumps({{"wall_ms": 1000 * (w1 - w0) / n, "user_ms": 1000 * (t1.user - t0.user) / n,
                  "kernel_ms": 1000 * (t1.system - t0.system) / n,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

ENCODER = """
from blitext.models.loading import load_vision_encoder
from blitext.models.registry import DEFAULT_VISION_ENCODER
encoder = load_vision_encoder(DEFAULT_VISION_ENCODER)
h, w = encoder.preprocess.out_size
x = torch.randn(32, 3, h, w)
def work():
    with torch.inference_mode():
        encoder(x)
"""

LLM_STEP = """
from blitext.models.loading import load_llm
from blitext.models.registry import DEFAULT_LLM
model = load_llm(DEFAULT_LLM).model
embeds = torch.randn(16, 40, model.config.hidden_size, requires_grad=True)
labels = torch.randint(0, model.config.vocab_size, (16, 40))
def work():
    model(inputs_embeds=embeds, labels=labels).loss.backward()
"""

WORKLOADS = {"encoder": (ENCODER, 32, 5, 1), "llm_step": (LLM_STEP, 1, 5, 2)}  # setup, items, repeats, threads


def measure(workload: str, kept: bool) -> dict:
    setup, items, repeats, threads = WORKLOADS[workload]
    code = MEASURE.format(kept=kept, threads=threads, setup=setup, repeats=repeats, items=items)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    args = ap.parse_args(argv)
    commit = git_commit()
    runs = {(w, kept): [] for w in WORKLOADS for kept in (False, True)}
    for _ in range(args.rounds):
        for workload in WORKLOADS:
            for kept in (False, True):
                runs[workload, kept].append(measure(workload, kept))
    figures = {}
    for workload in WORKLOADS:
        for kept, name in ((False, "glibc_default"), (True, "kept")):
            figures.setdefault(workload, {})[name] = {
                k: round(float(np.median([r[k] for r in runs[workload, kept]])), 1) for k in runs[workload, kept][0]}
        default, mine = figures[workload]["glibc_default"]["wall_ms"], figures[workload]["kept"]["wall_ms"]
        figures[workload]["speedup"] = round(default / mine, 2)
    write_result("cpu_allocator", {"commit": commit, "command": " ".join(["python bench/cpu_allocator.py", *(argv or sys.argv[1:])]),
                                   "note": args.note, "rounds": args.rounds, "per": {"encoder": "image", "llm_step": "step"},
                                   "figures": figures})


if __name__ == "__main__":
    main()
