"""Extraction at steady state from webdataset .tar shards through torchrun, against the bare encoder.

    python bench/extract_scale.py [--images 10000] [--ranks 2] [--encoder efficientnet-lite0] [--device cpu]

1. Writes `--images` JPEG photos-to-be (640 x 480) into .tar shards in img2dataset's layout
   (NNNNNNNNN.jpg + .txt + .json), `--per-tar` to a shard.
2. Bare: the encoder's forward alone on the same images, decoded and preprocessed in memory
   beforehand, in `--ranks` processes at once (each its share of the images: on a CPU the same
   cores extract-features' ranks have; on GPUs one each), with the allocator settings CPU runs
   use (blitext/allocator.py); the summed rate after the first `--skip` images. Also the rate
   of decoding and preprocessing alone, one process, one core: on a CPU the same cores decode
   and encode, so extract-features can reach at most forward / (forward + decode) of the bare
   rate there (`cpu_ceiling`); with a GPU encoding, decoding runs beside it.
3. extract-features on the tar folder under torchrun (`--ranks` processes), twice: on the first
   `--skip` images and on all. The steady-state rate is (images - skip) / (the difference of the
   two wall times): start-up (imports, model loading, workers, the manifest) cancels out.
   Goal (issue 20): at least 0.95 of the bare rate (x ranks where each rank has its own GPU).
4. The same run killed (SIGKILL to the whole launcher group) at `--kill-at` of its wall time,
   then run again: its shards must equal the uninterrupted run's, byte for byte.
Every process runs one intra-op thread (OMP_NUM_THREADS=1), as byte equality across rank
layouts needs; the bare forward too, so the two rates compare like with like on a CPU.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import git_commit, write_result  # noqa: E402

BIN = Path(sys.executable).parent


def write_tars(folder: Path, images: int, per_tar: int) -> None:
    """Photos-to-be: smooth colour fields plus noise, so JPEG decoding costs what a photo's does."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = np.stack(np.meshgrid(np.linspace(0, 1, 640), np.linspace(0, 1, 480)), -1)  # (480, 640, 2)
    for t in range(0, images, per_tar):
        with tarfile.open(folder / f"{t // per_tar:05d}.tar", "w") as tar:
            for i in range(t, min(t + per_tar, images)):
                colour = rng.uniform(0, 255, 3) * np.concatenate([base, base[..., :1]], -1)
                pixels = np.clip(colour + rng.normal(0, 12, colour.shape), 0, 255).astype(np.uint8)
                jpeg = BytesIO()
                Image.fromarray(pixels).save(jpeg, format="JPEG", quality=90)
                for ext, data in (("jpg", jpeg.getvalue()), ("txt", f"picture number {i}".encode()),
                                  ("json", f'{{"key": "{i:09d}"}}'.encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, BytesIO(data))


def bare_rate(data: Path, encoder_name: str, batch_size: int, skip: int, device: str, part: int = 0, parts: int = 1) -> float:
    """Images/s of the forward alone after the first `skip` images (inputs ready in memory), on
    every `parts`-th image from `part`."""
    import torch

    from blitext.allocator import keep_freed_memory
    from blitext.data.images import load_image
    from blitext.features.image import ExtractConfig, plan_items
    from blitext.models.loading import load_vision_encoder

    torch.set_num_threads(1)
    if device == "cpu":
        keep_freed_memory()  # as run_distributed does for extract-features' ranks
    encoder = load_vision_encoder(encoder_name, device=device)
    items = plan_items(ExtractConfig(data=str(data), vision_encoder=encoder_name, batch_size=batch_size))
    mine = range(part, len(items), parts)
    pixels = torch.stack([encoder.preprocess(load_image(items[i].root, items[i].ref)) for i in mine]).to(device)
    with torch.inference_mode():
        times = []
        for batch in pixels.split(batch_size):
            encoder(batch)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter())
    first = skip // parts // batch_size  # the batch that ends at this process's share of `skip` images
    return (len(mine) - (first + 1) * batch_size) / (times[-1] - times[first])


def bare_rate_together(data: Path, args) -> float:
    """The bare forward in `--ranks` processes at once (cuda: cuda:0, cuda:1, ...), their rates summed."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    devices = [f"cuda:{r}" if args.device.startswith("cuda") else args.device for r in range(args.ranks)]
    with ProcessPoolExecutor(args.ranks, mp_context=get_context("spawn")) as pool:
        rates = pool.map(bare_rate, *zip(*[(data, args.encoder, args.batch_size, args.skip, d, r, args.ranks)
                                           for r, d in enumerate(devices)]))
        return sum(rates)


def decode_rate(data: Path, encoder_name: str, images: int, decode: str, batch_size: int) -> float:
    """Images/s of reading, decoding and preprocessing alone, one core: what extract-features'
    workers do, and the normalising of their batches that the encoder's process does."""
    import torch

    from blitext.allocator import keep_freed_memory
    from blitext.features.image import ExtractConfig, decoded_images, plan_items
    from blitext.models.loading import load_vision_encoder

    torch.set_num_threads(1)
    keep_freed_memory()
    config = ExtractConfig(data=str(data), vision_encoder=encoder_name, decode=decode)
    items = plan_items(config)
    preprocess = load_vision_encoder(encoder_name, device="cpu").preprocess
    decoded, n = decoded_images(items, preprocess, config), min(images, len(items))
    t = time.process_time()
    for start in range(0, n, batch_size):
        preprocess.normalise(torch.stack([decoded[i][1] for i in range(start, min(start + batch_size, n))]))
    return n / (time.process_time() - t)


def extract_cmd(data: Path, out: Path, args, limit: int | None = None) -> list[str]:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(args.ranks), "--no-python",
           str(BIN / "blitext"), "extract-features", "--data", str(data), "--out", str(out),
           "--vision-encoder", args.encoder, "--batch-size", str(args.batch_size),
           "--shard-size", str(args.shard_size), "--num-workers", str(args.num_workers), "--device", args.device,
           "--decode", args.decode]
    return cmd + (["--limit", str(limit)] if limit else [])


def timed_run(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=ONE_THREAD)
    return time.perf_counter() - t


def killed_then_resumed(cmd: list[str], after_s: float) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD,
                            start_new_session=True)
    time.sleep(after_s)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank and worker, as a lost node would
    proc.wait()
    subprocess.run(cmd, check=True, capture_output=True, env=ONE_THREAD)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.h5"))}


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def main(argv=None) -> None:
    commit = git_commit()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--per-tar", type=int, default=1_000)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--encoder", default="efficientnet-lite0")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (each rank takes its own GPU)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--decode", default="full", help="extract-features --decode: full or draft")
    ap.add_argument("--skip", type=int, default=100, help="images counted as start-up")
    ap.add_argument("--kill-at", type=float, default=0.6, help="kill the resume check's run at this share of its time")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--result", default="extract_scale", help="bench/results/<RESULT>.json")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="blitext-extract-scale-"))
    data = work / "tars"
    if not data.is_dir():
        write_tars(data, args.images, args.per_tar)
    bare = bare_rate_together(data, args)
    decode = decode_rate(data, args.encoder, 1_000, args.decode, args.batch_size)
    start_s = timed_run(extract_cmd(data, work / "first", args, limit=args.skip))
    full_s = timed_run(extract_cmd(data, work / "full", args))
    # None: the short run took as long as the full one, so start-up (or the machine's load) swamped it
    steady = (args.images - args.skip) / (full_s - start_s) if full_s > start_s else None
    killed_then_resumed(extract_cmd(data, work / "killed", args), args.kill_at * full_s)
    same = shard_bytes(work / "full") == shard_bytes(work / "killed")
    # on a CPU each image costs its forward and its decoding on the same cores (per core: ranks / bare)
    ceiling = (args.ranks / bare) / (args.ranks / bare + 1 / decode) if args.device == "cpu" else 1.0
    write_result(args.result, {
        "commit": commit, "command": "python bench/extract_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "note": args.note, "images": args.images, "per_tar": args.per_tar, "ranks": args.ranks,
        "encoder": args.encoder, "decode": args.decode, "device": args.device, "batch_size": args.batch_size, "skip": args.skip,
        "bare_images_per_s": round(bare, 2), "bare_processes": args.ranks,
        "decode_images_per_s_one_core": round(decode, 2), "cpu_ceiling": round(ceiling, 3),
        "first_skip_images_wall_s": round(start_s, 2), "all_images_wall_s": round(full_s, 2),
        "steady_images_per_s": steady and round(steady, 2), "ratio": steady and round(steady / bare, 3),
        "ratio_of_ceiling": steady and round(steady / bare / ceiling, 3), "goal": ">= 0.95",
        "killed_at_s": round(args.kill_at * full_s, 2), "resume_bytes_equal": same,
    })


if __name__ == "__main__":
    main()
