#!/usr/bin/env bash
# The paper-size measurements on a lent GPU machine (bf16): extraction throughput, a P-Former
# step and both adaptor steps; writes bench/results/gpu_bench.json (and $OUT/gpu_bench.json).
# That machine's python3 has torch and transformers; blitext runs from the checkout. The
# tokenizers come from .gpu/: run `PYTHONPATH=. python bench/gpu_bench.py --prepare` here first
# (it is git-ignored: the device call carries it), and `BENCH_SMOKE=1` to rehearse on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export BLITEXT_CACHE=${BLITEXT_CACHE:-/tmp/blitext-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 bench/gpu_bench.py
