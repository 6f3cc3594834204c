"""Injects faults into every phase and checks each is survived without losing work.

    python bench/faults.py [--kills 3] [--seed 0] [--cases all|issue22]

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
flipped past 2**63, after the cache was finished (each given to train-adapter, which reads the
rows at the offsets index/places.npy recorded, checksummed, and must finish identical to the
reference run; `cache verify` must name the shard); a real tmpfs filled while train-adapter appends
metrics.jsonl (then freed, and --resume latest), and one too small for eval's results; `--out`
naming a real file, and a path under it, for every command that writes a folder; 16 flipped
bytes in final/model.safetensors loaded by eval, generate, export, blitext.load, --init and
build-prompts; a photo stored sideways with EXIF orientation 6 against the same photo upright.

Tiny random models as in tests/conftest.py; every process runs one intra-op thread (the
condition for byte equality between runs). Writes results/faults.json with the git commit.

The world and the reference runs are in fault_world.py, the faults since issue 11 in
fault_cases.py, issue 22's in fault_issue22.py, the comparisons and damage in fault_checks.py.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from common import git_commit, write_result  # noqa: E402
from fault_cases import damaged_cache_fault, damaged_checkpoint_fault, kill_fault, real_disk_faults, \
    write_fault  # noqa: E402
from fault_checks import break_metadata, flip_rows, truncate  # noqa: E402
from fault_issue22 import issue22_faults  # noqa: E402
from fault_world import commands, env, make_world, timed_reference  # noqa: E402


# ---------------------------------------------------------------- main

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
