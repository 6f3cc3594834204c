"""bench/faults.py's world: tiny random models and 96 drawn images, each phase's command line,
the uninterrupted reference runs, and running `blitext` (optionally through a driver process that
injects one fault) with one intra-op thread."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fault_checks import is_cache

BLITEXT = Path(sys.executable).parent / "blitext"
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 160, 60)}
SHAPES = ("circle", "square")

# A process that injects one fault into `blitext` (argv: FAULT ARG, then the command line).
DRIVER = r'''
import errno, os, sys
from pathlib import Path
fault, arg, args = sys.argv[1], sys.argv[2], sys.argv[3:]
ENOSPC = lambda path: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
if fault == "enospc-shard":  # the cache writer's files hold `arg` bytes in all, then the disk is full
    import blitext.cache.writer as writer
    budget = [int(arg)]
    class OnDisk:
        def __init__(self, f, path): self.f, self.path = f, path
        def write(self, data):
            size = memoryview(data).nbytes
            if size > budget[0]:
                raise ENOSPC(self.path)
            budget[0] -= size
            return self.f.write(data)
        def __getattr__(self, name): return getattr(self.f, name)
    writer.open = lambda path, mode="r", *a, **kw: OnDisk(open(path, mode, *a, **kw), path)
elif fault == "enospc-checkpoint":  # the `arg`-th checkpoint's weights meet a full disk
    calls, real = [0], Path.write_bytes
    def write_bytes(self, data):
        if self.name == "model.safetensors":
            calls[0] += 1
            if calls[0] >= int(arg):
                raise ENOSPC(self)
        return real(self, data)
    Path.write_bytes = write_bytes
elif fault == "eacces-mkdir":  # folders under `arg` cannot be created (read-only parent)
    real_mkdir, locked = Path.mkdir, Path(arg)
    def mkdir(self, *a, **kw):
        if self == locked or locked in self.parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **kw)
    Path.mkdir = mkdir
from blitext.cli.main import app
app(args, prog_name="blitext")
'''


def make_world(root: Path) -> dict:
    import torch
    from PIL import Image, ImageDraw

    from conftest import make_bert_folder, make_llm_folder, make_vision_folder

    torch.manual_seed(0)
    models = {"vit": make_vision_folder("vit", root / "vit"), "opt": make_llm_folder("opt", root / "opt"),
              "bert": make_bert_folder(root / "bert")}
    (root / "data" / "images").mkdir(parents=True)
    entries = []
    for i in range(96):
        colour, shape = list(COLOURS)[i % 3], SHAPES[(i // 3) % 2]
        image = Image.new("RGB", (32, 32), "white")
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)((4 + i % 5, 4, 26, 26 - i % 3), fill=COLOURS[colour])
        image.save(root / "data" / "images" / f"{i}.png")
        entries.append({"image": f"images/{i}.png", "image_id": f"img{i}", "caption": [f"a {colour} {shape}"]})
    captions = root / "data" / "captions_train.json"
    captions.write_text(json.dumps(entries))
    return {**{k: str(v) for k, v in models.items()}, "captions": str(captions), "root": root}


def commands(w: dict) -> dict:
    """Each phase's command line without --out (and without --resume)."""
    root = w["root"]
    return {
        "extract-features": ["extract-features", "--data", w["captions"], "--vision-encoder", w["vit"],
                             "--batch-size", "2", "--shard-size", "4", "--num-workers", "0", "--device", "cpu"],
        "train-pformer": ["train-pformer", "--text", w["captions"], "--llm", w["opt"], "--text-encoder", w["bert"],
                          "--n-prompt", "4", "--batch-size", "4", "--max-steps", "60", "--warmup-steps", "2",
                          "--save-every", "3", "--heldout", "2", "--sample-every", "1000", "--device", "cpu"],
        "build-prompts": ["build-prompts", "--pformer", str(root / "ref" / "train-pformer"),
                          "--captions", w["captions"], "--batch-size", "8", "--shard-size", "16", "--device", "cpu"],
        "adapter stage 1": ["train-adapter", "--stage", "1", "--features", str(root / "ref" / "extract-features"),
                            "--prompts", str(root / "ref" / "build-prompts"), "--captions", w["captions"],
                            "--text-encoder", w["bert"], "--llm", w["opt"], "--batch-size", "4", "--max-steps", "36",
                            "--warmup-steps", "2", "--save-every", "3", "--log-every", "1", "--device", "cpu"],
        "adapter stage 2": ["train-adapter", "--stage", "2", "--features", str(root / "ref" / "extract-features"),
                            "--prompts", str(root / "ref" / "build-prompts"), "--captions", w["captions"],
                            "--init", str(root / "ref" / "adapter stage 1"), "--text-encoder", w["bert"],
                            "--llm", w["opt"], "--batch-size", "4", "--max-steps", "36", "--warmup-steps", "2",
                            "--save-every", "3", "--log-every", "1", "--device", "cpu"],
    }


def eval_command(w: dict, tmp: Path, *more: str) -> list[str]:
    """eval caption of the reference stage-2 run on the world's 96 images (1 beam, 2 tokens: fast)."""
    return ["eval", "caption", "--adapter", str(tmp / "ref" / "adapter stage 2"), "--features",
            str(tmp / "ref" / "extract-features"), "--data", w["captions"], "--device", "cpu", "--num-beams", "1",
            "--max-new-tokens", "2", "--min-new-tokens", "1", "--meteor", "off", "--spice", "off", *more]


def env(cache_root: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "BLITEXT_CACHE": str(cache_root),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}


def run(args: list[str], e: dict, fault: tuple[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", DRIVER, *fault, *args] if fault else [str(BLITEXT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=timeout)


# ---------------------------------------------------------------- reference runs and waiting

def timed_reference(phase: str, cmd: list[str], out: Path, e: dict) -> float:
    """Runs the phase uninterrupted; returns the seconds from its first to its last write of work
    (kills are drawn in that span, not in model loading or the interpreter's exit)."""
    proc = subprocess.Popen([str(BLITEXT), *cmd, "--out", str(out)], env=e, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    started = wait_for(lambda: started_work(phase, out), proc)
    finished = wait_for(lambda: finished_work(phase, out), proc)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"reference {phase} failed:\n{err[-3000:]}")
    return finished - started


def started_work(phase: str, out: Path) -> bool:
    """The cache's run.json, or a trainer's first logged step."""
    if is_cache(phase):
        return (out / "run.json").exists()
    metrics = out / "metrics.jsonl"
    return metrics.exists() and metrics.stat().st_size > 0


def finished_work(phase: str, out: Path) -> bool:
    """The cache's manifest, or a trainer's exported final weights."""
    return (out / "manifest.json").exists() if is_cache(phase) else (out / "final" / "state.json").exists()


def wait_for(ready, proc, timeout: float = 300) -> float:
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    return time.perf_counter()


def mount(args: list[str]) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def fill(path: Path) -> None:
    """Write zeros to `path` until the disk holding it is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(bytes(1 << 20))
                f.flush()
        except OSError:
            pass
