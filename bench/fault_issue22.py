"""bench/faults.py's issue-22 faults, all real: chunk-index damage after the cache was finished
(read intact since index/places.npy; `cache verify` names it), `--out` naming a file, damaged
final weights loaded by every path, a real tmpfs filled during a metrics append and one too small
for eval's results, an EXIF-rotated photo."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from fault_cases import index_damage_fault
from fault_checks import exif_photos, flip_chunk_address, flip_weights, identical, move_chunk, one_line_refusal, \
    whole_jsonl
from fault_world import BLITEXT, eval_command, fill, mount, run, wait_for


def issue22_faults(w: dict, cmds: dict, tmp: Path, e: dict) -> list[dict]:
    results = [index_damage_fault(name, w, cmds, damage, e, tmp)
               for name, damage in (("chunk moved in the index", move_chunk),
                                    ("chunk address flipped", flip_chunk_address))]
    results += out_is_a_file_faults(w, cmds, tmp, e)
    results += damaged_weights_faults(w, cmds, tmp, e)
    results += [r for r in (metrics_full_disk_fault(cmds, tmp, e), eval_full_disk_fault(w, tmp, e)) if r]
    results.append(exif_fault(w, tmp, e))
    return results


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
