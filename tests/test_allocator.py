"""CPU runs keep freed memory for the next batch (blitext/allocator.py), seen in malloc's own
account (mallinfo2), in a fresh process each: malloc's settings are per process."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# A forward's activations: 256 MB allocated and freed. Kept, they stay in the heap as free
# bytes (the next batch's pages are already there); by default they go back to the kernel.
FREED_BYTES_KEPT = """
import ctypes
{setup}
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Mallinfo2
libc.free(libc.malloc(256 << 20))
print(libc.mallinfo2().fordblks / (256 << 20))
"""


def freed_share_kept(setup: str, **env: str) -> float:
    out = subprocess.run([sys.executable, "-c", FREED_BYTES_KEPT.format(setup=setup)],
                         capture_output=True, text=True, check=True, env={**os.environ, **env})
    return float(out.stdout)


def test_freed_memory_is_kept_in_the_heap():
    assert freed_share_kept("") < 0.1  # glibc's default: an mmap of its own, unmapped when freed
    assert freed_share_kept("from blitext.allocator import keep_freed_memory\nassert keep_freed_memory()") > 0.99


def test_cpu_runs_keep_freed_memory_and_others_do_not():
    """Phase tools start in run_distributed, evaluation and blitext.load in use_device."""
    run = "from blitext.distributed import run_distributed\nrun_distributed({!r}, lambda device, info: None)"
    assert freed_share_kept(run.format("cpu")) > 0.99
    assert freed_share_kept("from blitext.distributed import use_device\nuse_device('cpu')") > 0.99
    # a GPU named where there is none is refused before anything is set
    refused = "import pytest\nwith pytest.raises(Exception):\n    " + run.format("cuda").replace("\n", "\n    ")
    assert freed_share_kept(refused) < 0.1


def test_blitext_keep_freed_memory_0_leaves_glibcs_defaults():
    run = "from blitext.distributed import run_distributed\nrun_distributed('cpu', lambda device, info: None)"
    assert freed_share_kept(run, BLITEXT_KEEP_FREED_MEMORY="0") < 0.1
    assert freed_share_kept(run, BLITEXT_KEEP_FREED_MEMORY="1") > 0.99
