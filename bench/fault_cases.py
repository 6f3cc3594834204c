"""bench/faults.py's faults since issue 11: kill -9 then resume, a full disk and an unwritable
folder (injected, and real as root), damaged caches given to train-adapter (refused; or, for
chunk-index damage after the cache was finished, read intact), a damaged checkpoint given to
--resume latest."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from pathlib import Path

from fault_checks import identical, is_cache, one_line_refusal, same_cache, same_weights, steps_lost
from fault_world import BLITEXT, mount, run, started_work, wait_for


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
    copy, _, shard, damaged_rows, first = train_on_damaged_copy(name, cmds, damage, e, tmp)
    refused, line = one_line_refusal(first)
    verify, repaired = verify_then_repair(copy, shard, cmds, e, tmp)
    return {"fault": name, "phase": "adapter stage 1", "injected": True, "survived": refused and shard in line,
            "lost": 0 if refused else (damaged_rows if first.returncode == 0 else None),
            "detail": f"{line[:220]} | cache verify exit {verify.returncode} | {repair_note(shard, repaired)}"}


def index_damage_fault(name: str, w: dict, cmds: dict, damage, e: dict, tmp: Path) -> dict:
    """Damage to a shard's HDF5 chunk index after the cache was finished. Rows are read at the
    byte offsets index/places.npy recorded when it was finished, each checked against its
    Fletcher-32 checksum, so the index no longer matters to train-adapter: it finishes identical
    to the reference run (or, were a row's bytes really unreadable, refuses naming the shard).
    `cache verify` walks the chunk index, so it still names the shard; then the same repair."""
    copy, trained_run, shard, _, first = train_on_damaged_copy(name, cmds, damage, e, tmp)
    refused, line = one_line_refusal(first)
    ran = first.returncode == 0
    same, lost = identical("adapter stage 1", tmp / "ref" / "adapter stage 1", trained_run) if ran \
        else (False, 0 if refused else None)
    verify, repaired = verify_then_repair(copy, shard, cmds, e, tmp)
    named = verify.returncode != 0 and shard in verify.stdout + verify.stderr
    trained = f"train-adapter finished, {'identical' if same else 'DIFFERENT'} to the reference run" if ran \
        else line[:220]
    return {"fault": name, "phase": "adapter stage 1", "injected": True,
            "survived": (same or (refused and shard in line)) and named, "lost": lost,
            "detail": f"{trained} | cache verify exit {verify.returncode}, "
                      f"{'names' if named else 'does NOT name'} {shard} | {repair_note(shard, repaired)}"}


def train_on_damaged_copy(name: str, cmds: dict, damage, e: dict, tmp: Path):
    """A copy of the reference cache, damaged, given to adapter stage 1: (the copy, the run's
    folder, the damaged shard's name, the rows damaged, the finished process)."""
    copy = tmp / name.replace(" ", "-")
    shutil.copytree(tmp / "ref" / "extract-features", copy)
    shard, damaged_rows = damage(copy)
    cmd = list(cmds["adapter stage 1"])
    cmd[cmd.index("--features") + 1] = str(copy)
    out = tmp / f"{copy.name}-run"
    return copy, out, shard, damaged_rows, run([*cmd, "--out", str(out)], e)


def verify_then_repair(copy: Path, shard: str, cmds: dict, e: dict, tmp: Path):
    """`cache verify` of the damaged copy, then the repair its message names (delete the shard and
    its sidecar, run extract-features again): (verify's process, whether the cache is identical)."""
    verify = run(["cache", "verify", str(copy)], e)
    (copy / shard).unlink(missing_ok=True)
    (copy / shard.replace(".h5", ".json")).unlink(missing_ok=True)
    repair = run([*cmds["extract-features"], "--out", str(copy)], e)
    return verify, repair.returncode == 0 and same_cache(tmp / "ref" / "extract-features", copy)


def repair_note(shard: str, repaired: bool) -> str:
    return f"repaired by deleting {shard} and re-running extract-features: {'identical' if repaired else 'NOT identical'}"


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
