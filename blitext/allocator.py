"""Keep freed memory in the process on CPU runs, so a model's activations are not page-faulted
in again on every forward.

glibc's malloc serves every block over 32 MB (and, before its threshold adapts, over 128 KB)
with its own mmap and returns it to the kernel when freed: a CPU forward over a batch allocates
and frees hundreds of MB of activations, and each new page costs a fault and a zeroing in the
kernel. EfficientNet-Lite0's forward on 32 images at 224 px spent 47 of its 85 ms per image in
the kernel this way; with the heap kept, 30 ms in all (bench/cpu_allocator.py, 2 cores; a small
LLM's training step: 1.12x). PyTorch's CPU
tuning guide suggests preloading jemalloc or tcmalloc for the same reason; mallopt needs no
library and no environment set before the process starts, which a CLI command cannot do.

GPU runs keep their own caching allocator on the device, and their CPU work (decoding) frees
small blocks: only runs on the CPU set this.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

# Freed memory kept at the top of the heap before any is given back: more than one forward frees
# at once (with 256 MB, that forward still spent a quarter of its time in the kernel).
KEEP_BYTES = 1 << 30

# "0" leaves glibc's defaults: where many CPU processes share a machine's memory, each keeping
# up to KEEP_BYTES may cost more than the page faults do.
ENV = "BLITEXT_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap (no mmap) and keep up to KEEP_BYTES of freed memory;
    True where it took effect (glibc), False elsewhere (other C libraries keep their own ways) or
    where BLITEXT_KEEP_FREED_MEMORY=0."""
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success; setting either also stops glibc adapting its thresholds
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
