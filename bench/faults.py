"""Injects faults into every phase and checks each is survived without losing work.

    python bench/faults.py [--kills 2] [--seed 0] [--cases all|issue22]

A fault is survived when the job either finished correctly after the same command was run
again (a cache identical byte for byte, final weights identical tensor for tensor, to an
uninterrupted run), or was refused with one clear line (exit 2, no traceback). Rows or steps
lost: rows of the reference cache missing or different after the resume, steps of the
reference run missing or with another loss; for a refused fault, the damaged rows the job
read without noticing (0 when refused).

Faults: kill -9 at seeded random points of extract-features, train-pformer and both
train-adapter stages, then resume; a full disk (ENOSPC injected into the cache writer's
file, and into a checkpoint's write); an unwritable cache folder (EACCES injected at mkdir);
flipped bits in every row of a shard, damaged HDF5 metadata, a truncated shard (each given
to train-adapter); a damaged checkpoint given to --resume latest. Run as root, it also
fills a real 1 MiB tmpfs and writes into a read-only mount.

Issue 22's faults, all real: a row's chunk moved in a shard's chunk index and a chunk address
flipped past 2**63 (each given to train-adapter); a real tmpfs filled while train-adapter appends
metrics.jsonl (then freed, and --resume latest), and one too small for eval's results; `--out`
naming a real file, and a path under it, for every command that writes a folder; 16 flipped
bytes in final/model.safetensors loaded by eval, generate, export, blitext.load, --init and
build-prompts; a photo stored sideways with EXIF orientation 6 against the same photo upright.

Tiny random models as in tests/conftest.py; every process runs one intra-op thread (the
condition for byte equality between runs). Writes results/faults.json with the git commit.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from common import write_result  # noqa: E402
from fault_checks import (break_metadata, exif_photos, flip_chunk_address, flip_rows, flip_weights,  # noqa: E402
                          identical, is_cache, move_chunk, one_line_refusal, same_cache, same_weights, steps_lost,
                          truncate, whole_jsonl)

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


# ---------------------------------------------------------------- the world: tiny models and data

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


def env(cache_root: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "BLITEXT_CACHE": str(cache_root),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}


def run(args: list[str], e: dict, fault: tuple[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", DRIVER, *fault, *args] if fault else [str(BLITEXT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=timeout)


# ---------------------------------------------------------------- faults

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


def kill_fault(phase: str, cmd: list[str], ref: Path, out: Path, work_s: float, rng: random.Random, e: dict) -> dict:
    proc = subprocess.Popen([str(BLITEXT), *cmd, "--out", str(out)], env=e, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for(lambda: started_work(phase, out), proc)
    delay = rng.uniform(0.02, 0.98) * work_s
    time.sleep(delay)
    alive = proc.poll() is None
    proc.kill()
    proc.wait()
    progress = progress_of(phase, out)
    resumed = run([*cmd, "--out", str(out), *([] if is_cache(phase) else ["--resume", "latest"])], e)
    same, lost = identical(phase, ref, out) if resumed.returncode == 0 else (False, None)
    return {"fault": "kill -9", "phase": phase, "injected": alive, "survived": resumed.returncode == 0 and same,
            "lost": lost, "detail": f"after {delay:.2f} s of work ({progress}); resumed exit {resumed.returncode}, "
                                    f"{'identical' if same else 'DIFFERENT'} to the uninterrupted run"
            + ("" if resumed.returncode == 0 else f": {resumed.stderr[-300:]}")}


def progress_of(phase: str, out: Path) -> str:
    if is_cache(phase):
        return f"{len(list(out.glob('shard-*.json')))} shard(s) done"
    latest = out / "checkpoints" / "latest"
    return f"checkpoint {latest.read_text().strip()}" if latest.exists() else "no checkpoint yet"


def write_fault(name: str, phase: str, cmd: list[str], ref: Path, out: Path, fault: tuple[str, str] | None,
                e: dict, expect: str, resume: list[str] = (), before=None, after=None) -> dict:
    """A fault while writing: refused in one line naming the folder, nothing half-written left,
    then (fault gone) the same command finishes identical to the uninterrupted run."""
    if before:
        before()
    first = run([*cmd, "--out", str(out)], e, fault)
    refused, line = one_line_refusal(first)
    leftovers = [p.name for p in out.rglob("*") if ".tmp" in p.name] if out.exists() else []
    if after:
        after()
    again = run([*cmd, "--out", str(out), *resume], e)
    same, lost = identical(phase, ref, out) if again.returncode == 0 else (False, None)
    survived = refused and expect in line and not leftovers and again.returncode == 0 and same
    return {"fault": name, "phase": phase, "injected": True, "survived": survived, "lost": lost,
            "detail": f"{line[:220]} | temp files left: {len(leftovers)} | rerun exit {again.returncode}, "
                      f"{'identical' if same else 'DIFFERENT'}"}


def damaged_cache_fault(name: str, w: dict, cmds: dict, damage, e: dict, tmp: Path) -> dict:
    """A damaged feature cache given to train-adapter: refused naming the shard; then the repair
    the message names (delete the shard and its sidecar, run extract-features again)."""
    ref = tmp / "ref" / "extract-features"
    copy = tmp / name.replace(" ", "-")
    shutil.copytree(ref, copy)
    shard, damaged_rows = damage(copy)
    cmd = list(cmds["adapter stage 1"])
    cmd[cmd.index("--features") + 1] = str(copy)
    first = run([*cmd, "--out", str(tmp / f"{copy.name}-run")], e)
    refused, line = one_line_refusal(first)
    verify = run(["cache", "verify", str(copy)], e)
    (copy / shard).unlink(missing_ok=True)
    (copy / shard.replace(".h5", ".json")).unlink(missing_ok=True)
    repair = run([*cmds["extract-features"], "--out", str(copy)], e)
    repaired = repair.returncode == 0 and same_cache(ref, copy)
    return {"fault": name, "phase": "adapter stage 1", "injected": True, "survived": refused and shard in line,
            "lost": 0 if refused else (damaged_rows if first.returncode == 0 else None),
            "detail": f"{line[:220]} | cache verify exit {verify.returncode} | repaired by deleting {shard} "
                      f"and re-running extract-features: {'identical' if repaired else 'NOT identical'}"}


def damaged_checkpoint_fault(cmds: dict, tmp: Path, e: dict) -> dict:
    """Bytes flipped inside the latest checkpoint's weights: --resume latest refuses, naming the
    checkpoint before it; resuming from that one finishes identical to the uninterrupted run."""
    ref = tmp / "ref" / "train-pformer"
    run_dir = tmp / "damaged-checkpoint"
    shutil.copytree(ref, run_dir)
    ckpt = run_dir / "checkpoints"
    latest = ckpt / (ckpt / "latest").read_text().strip()
    weights = latest / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x01  # inside a tensor: the file still parses
    weights.write_bytes(bytes(raw))
    cmd = cmds["train-pformer"]
    first = run([*cmd, "--out", str(run_dir), "--resume", "latest"], e)
    refused, line = one_line_refusal(first)
    earlier = sorted(p for p in ckpt.glob("step-*") if p.name < latest.name)[-1]
    again = run([*cmd, "--out", str(run_dir), "--resume", str(earlier)], e)
    same = again.returncode == 0 and same_weights(ref, run_dir)
    return {"fault": "damaged checkpoint", "phase": "train-pformer", "injected": True,
            "survived": refused and earlier.name in line, "lost": 0 if refused else None,
            "detail": f"{line[:220]} | --resume {earlier.name}: exit {again.returncode}, "
                      f"{'identical' if same else 'DIFFERENT'}; steps lost {steps_lost(ref, run_dir)}"}


def mount(args: list[str]) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def real_disk_faults(cmds: dict, tmp: Path, e: dict) -> list[dict]:
    """As root: a real tmpfs that fills during extraction (made larger after: space freed), and a
    read-only tmpfs (made writable after)."""
    results = []
    ref = tmp / "ref" / "extract-features"
    small, ro = tmp / "small-disk", tmp / "ro-disk"
    small.mkdir()
    ro.mkdir()
    page = os.sysconf("SC_PAGE_SIZE")
    pages = -(-3 * (ref / "shard-00000.h5").stat().st_size // page) + 8  # ~3 shards, + sidecars, run.json, log
    if os.geteuid() != 0 or not mount(["-t", "tmpfs", "-o", f"size={pages * page}", "tmpfs", str(small)]):
        return results
    try:
        results.append(write_fault("disk full (real tmpfs)", "extract-features", cmds["extract-features"], ref,
                                   small / "cache", None, e, "no space left",
                                   after=lambda: mount(["-o", "remount,size=64m", str(small)])))
    finally:
        subprocess.run(["umount", str(small)])
    if mount(["-t", "tmpfs", "-o", "ro,size=64m", "tmpfs", str(ro)]):
        try:
            results.append(write_fault("read-only mount (real)", "extract-features", cmds["extract-features"], ref,
                                       ro / "cache", None, e, "is not writable",
                                       after=lambda: mount(["-o", "remount,rw", str(ro)])))
        finally:
            subprocess.run(["umount", str(ro)])
    return results


def eval_command(w: dict, tmp: Path, *more: str) -> list[str]:
    """eval caption of the reference stage-2 run on the world's 96 images (1 beam, 2 tokens: fast)."""
    return ["eval", "caption", "--adapter", str(tmp / "ref" / "adapter stage 2"), "--features",
            str(tmp / "ref" / "extract-features"), "--data", w["captions"], "--device", "cpu", "--num-beams", "1",
            "--max-new-tokens", "2", "--min-new-tokens", "1", "--meteor", "off", "--spice", "off", *more]


def refusal(name: str, phase: str, proc: subprocess.CompletedProcess, expect: str, extra: str = "") -> dict:
    refused, line = one_line_refusal(proc)
    return {"fault": name, "phase": phase, "injected": True, "survived": refused and expect in line,
            "lost": 0 if refused else None, "detail": f"{line[:220]}{extra}"}


def out_is_a_file_faults(w: dict, cmds: dict, tmp: Path, e: dict) -> list[dict]:
    """--out naming a real file, and a path under one, for every command that writes a folder:
    one line before any work, the file untouched."""
    file = tmp / "notes.txt"
    file.write_text("not a folder\n")
    phases = {p: [*cmds[p], "--out"] for p in ("extract-features", "train-pformer", "build-prompts",
                                                "adapter stage 1")}
    phases["eval caption"] = [*eval_command(w, tmp), "--out"]
    phases["export"] = ["export", str(tmp / "ref" / "adapter stage 2")]
    results = []
    for phase, cmd in phases.items():
        for out in (file, file / "sub"):
            proc = run([*cmd, str(out)], e)
            result = refusal(f"--out {'a file' if out == file else 'under a file'}", phase, proc, "is a file")
            result["survived"] &= file.read_text() == "not a folder\n"
            results.append(result)
    return results


def damaged_weights_faults(w: dict, cmds: dict, tmp: Path, e: dict) -> list[dict]:
    """16 flipped bytes in final/model.safetensors of copies of the reference runs, loaded by every
    path that reads a run's weights: each refuses in one line naming the sha256 check."""
    runs = {}
    for phase in ("adapter stage 1", "adapter stage 2", "train-pformer"):
        runs[phase] = tmp / f"damaged-{phase.replace(' ', '-')}"
        shutil.copytree(tmp / "ref" / phase, runs[phase])
        flip_weights(runs[phase] / "final")
    s1, s2, pformer = runs["adapter stage 1"], runs["adapter stage 2"], runs["train-pformer"]
    image = str(Path(w["captions"]).parent / "images" / "0.png")
    load = ("import sys, blitext\nfrom blitext.errors import BlitextError\ntry:\n    blitext.load(sys.argv[1], "
            "device='cpu')\nexcept BlitextError as e:\n    print('error:', e)\n    sys.exit(2)\n")
    stage2 = list(cmds["adapter stage 2"])
    stage2[stage2.index("--init") + 1] = str(s1)
    loads = {
        "eval caption": ["eval", "caption", *eval_command(w, tmp, "--out", str(tmp / "dmg-eval"))[2:]],
        "generate": ["generate", "--adapter", str(s2), "--images", image, "--device", "cpu", "--max-new-tokens", "2"],
        "export": ["export", str(s2), str(tmp / "dmg-export")],
        "train-adapter --init": [*stage2, "--out", str(tmp / "dmg-init")],
        "build-prompts": [*cmds["build-prompts"], "--out", str(tmp / "dmg-prompts")],
    }
    loads["eval caption"][loads["eval caption"].index("--adapter") + 1] = str(s2)
    loads["build-prompts"][loads["build-prompts"].index("--pformer") + 1] = str(pformer)
    results = [refusal("damaged weights", phase, run(cmd, e), "sha256") for phase, cmd in loads.items()]
    proc = subprocess.run([sys.executable, "-c", load, str(s2)], capture_output=True, text=True, env=e, timeout=600)
    results.append(refusal("damaged weights", "blitext.load", proc, "sha256"))
    return results


def fill(path: Path) -> None:
    """Write zeros to `path` until the disk holding it is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(bytes(1 << 20))
                f.flush()
        except OSError:
            pass


def metrics_full_disk_fault(cmds: dict, tmp: Path, e: dict) -> dict | None:
    """A real tmpfs filled while train-adapter runs (after its first checkpoint; it logs every
    step): one line and a whole metrics.jsonl; space freed, --resume latest ends identical."""
    disk = tmp / "metrics-disk"
    disk.mkdir()
    if os.geteuid() != 0 or not mount(["-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)]):
        return None
    phase, ref, out = "adapter stage 1", tmp / "ref" / "adapter stage 1", disk / "run"
    try:
        cmd = [str(BLITEXT), *cmds[phase], "--out", str(out)]
        proc = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: (out / "checkpoints" / "latest").exists(), proc)
        injected = proc.poll() is None
        fill(disk / "filler")
        stdout, stderr = proc.communicate()
        refused, line = one_line_refusal(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
        whole, logged = whole_jsonl(out / "metrics.jsonl"), len((out / "metrics.jsonl").read_text().splitlines())
        (disk / "filler").unlink()
        again = run([*cmds[phase], "--out", str(out), "--resume", "latest"], e)
        same, lost = identical(phase, ref, out) if again.returncode == 0 else (False, None)
    finally:
        subprocess.run(["umount", str(disk)])
    return {"fault": "disk full at a metrics append (real tmpfs)", "phase": phase, "injected": injected,
            "survived": refused and "no space left" in line and whole and again.returncode == 0 and same,
            "lost": lost, "detail": f"{line[:200]} | metrics.jsonl {'whole' if whole else 'TORN'} ({logged} lines) "
                                    f"| --resume latest exit {again.returncode}, {'identical' if same else 'DIFFERENT'}"}


def eval_full_disk_fault(w: dict, tmp: Path, e: dict) -> dict | None:
    """eval's results written to a real one-page tmpfs (predictions.json is larger): one line,
    no temp file left; on a larger disk the same eval writes them."""
    disk = tmp / "eval-disk"
    disk.mkdir()
    page = os.sysconf("SC_PAGE_SIZE")
    if os.geteuid() != 0 or not mount(["-t", "tmpfs", "-o", f"size={page}", "tmpfs", str(disk)]):
        return None
    try:
        cmd = eval_command(w, tmp, "--out", str(disk / "eval"))
        result = refusal("disk full at eval's results (real tmpfs)", "eval caption", run(cmd, e), "no space left")
        leftovers = [p.name for p in disk.rglob("*") if ".tmp" in p.name]
        mount(["-o", "remount,size=16m", str(disk)])
        again = run(cmd, e)
        written = (disk / "eval" / "metrics.json").exists()
    finally:
        subprocess.run(["umount", str(disk)])
    result["survived"] &= not leftovers and again.returncode == 0 and written
    result["detail"] += f" | temp files left: {len(leftovers)} | rerun exit {again.returncode}, metrics.json " \
                        f"{'written' if written else 'MISSING'}"
    return result


def exif_fault(w: dict, tmp: Path, e: dict) -> dict:
    """A photo stored sideways with EXIF orientation 6: its cached row equals the upright photo's."""
    from blitext.cache import FeatureCache

    data, out = exif_photos(tmp / "exif"), tmp / "exif-cache"
    proc = run(["extract-features", "--data", str(data), "--vision-encoder", w["vit"], "--batch-size", "2",
                "--num-workers", "0", "--device", "cpu", "--out", str(out)], e)
    same = proc.returncode == 0 and (FeatureCache(out)["phone"] == FeatureCache(out)["upright"]).all()
    return {"fault": "EXIF-rotated photo", "phase": "extract-features", "injected": True, "survived": bool(same),
            "lost": 0 if same else 1, "detail": f"extract exit {proc.returncode}; the sideways photo's row "
                                                 f"{'equals' if same else 'DIFFERS from'} the upright one's"}


def issue22_faults(w: dict, cmds: dict, tmp: Path, e: dict) -> list[dict]:
    results = [damaged_cache_fault(name, w, cmds, damage, e, tmp)
               for name, damage in (("chunk moved in the index", move_chunk),
                                    ("chunk address flipped", flip_chunk_address))]
    results += out_is_a_file_faults(w, cmds, tmp, e)
    results += damaged_weights_faults(w, cmds, tmp, e)
    results += [r for r in (metrics_full_disk_fault(cmds, tmp, e), eval_full_disk_fault(w, tmp, e)) if r]
    results.append(exif_fault(w, tmp, e))
    return results


# ---------------------------------------------------------------- main

def git_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return head + ("+dirty" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=3, help="kill -9 trials per phase")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", choices=("all", "issue22"), default="all", help="issue22: only issue 22's faults")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=ROOT / "cache", prefix="faults-") as tmp:
        tmp = Path(tmp)
        w = make_world(tmp)
        e = env(tmp / "cache-root")
        cmds = commands(w)
        work = {}
        for phase in ("extract-features", "train-pformer", "build-prompts", "adapter stage 1", "adapter stage 2"):
            work[phase] = timed_reference(phase, cmds[phase], tmp / "ref" / phase, e)
            print(f"reference {phase}: {work[phase]:.1f} s of work", flush=True)
        results = []

        def add(result: dict) -> None:
            results.append(result)
            print(row(result), flush=True)

        for phase in ("extract-features", "train-pformer", "adapter stage 1", "adapter stage 2"):
            for k in range(args.kills if args.cases == "all" else 0):
                add(kill_fault(phase, cmds[phase], tmp / "ref" / phase, tmp / f"kill-{phase.replace(' ', '-')}-{k}",
                               work[phase], rng, e))
        for result in issue22_faults(w, cmds, tmp, e):
            add(result)
        if args.cases == "issue22":
            cases_done(results, args, started, work)
            return
        one_shard = (tmp / "ref" / "extract-features" / "shard-00000.h5").stat().st_size
        add(write_fault("disk full (injected)", "extract-features", cmds["extract-features"],
                        tmp / "ref" / "extract-features", tmp / "enospc-cache",
                        ("enospc-shard", str(int(2.5 * one_shard))), e, "no space left"))
        add(write_fault("disk full at a checkpoint (injected)", "train-pformer", cmds["train-pformer"],
                        tmp / "ref" / "train-pformer", tmp / "enospc-run", ("enospc-checkpoint", "4"), e,
                        "no space left", resume=["--resume", "latest"]))
        add(write_fault("unwritable folder (injected)", "extract-features", cmds["extract-features"],
                        tmp / "ref" / "extract-features", tmp / "locked" / "cache",
                        ("eacces-mkdir", str(tmp / "locked")), e, "is not writable"))
        for name, damage in (("flipped bits in a shard", flip_rows), ("damaged shard metadata", break_metadata),
                             ("truncated shard", truncate)):
            add(damaged_cache_fault(name, w, cmds, damage, e, tmp))
        add(damaged_checkpoint_fault(cmds, tmp, e))
        for result in real_disk_faults(cmds, tmp, e):
            add(result)
    cases_done(results, args, started, work)


def cases_done(results: list[dict], args, started: float, work: dict) -> None:
    injected = [r for r in results if r["injected"]]
    lost = [r["lost"] for r in injected if r["lost"] is not None]
    summary = {"injected": len(injected), "survived": sum(r["survived"] for r in injected),
               "lost": sum(lost), "lost_unknown": sum(r["lost"] is None for r in injected)}
    print_table(results, summary)
    name = "faults" if args.cases == "all" else "faults_issue22"
    write_result(name, {"command": f"python bench/faults.py --kills {args.kills} --cases {args.cases}",
                        "git_commit": git_commit(), "seed": args.seed, "kills_per_phase": args.kills,
                        "minutes": round((time.perf_counter() - started) / 60, 1),
                        "reference_work_seconds": {k: round(v, 2) for k, v in work.items()},
                        "summary": summary, "faults": results})


def row(r: dict) -> str:
    lost = "?" if r["lost"] is None else str(r["lost"])
    return (f"{r['fault']:38s} {r['phase']:17s} {'yes' if r['injected'] else 'missed':7s} "
            f"{'yes' if r['survived'] else 'NO':9s} {lost:5s} {r['detail']}")


def print_table(results: list[dict], summary: dict) -> None:
    print(f"\n{'fault':38s} {'phase':17s} {'injected':7s} {'survived':9s} {'lost':5s} detail")
    for r in results:
        print(row(r))
    print(f"\n{summary['injected']} faults injected, {summary['survived']} survived, "
          f"{summary['lost']} rows/steps lost" + (f" ({summary['lost_unknown']} unknown)" if summary["lost_unknown"] else ""))


if __name__ == "__main__":
    main()
