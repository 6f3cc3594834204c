"""Before the stages: `blitext extract-features` - cache all patch tokens of a frozen image encoder.

Images are decoded and preprocessed in DataLoader workers; batches never cross a shard, so
a resumed or multi-rank run feeds the encoder exactly the batches a single uninterrupted
run does, and writes byte-identical shards. Launch on several GPUs or CPU processes with
`torchrun --nproc_per_node N --no-python blitext extract-features ...`.
"""
from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from blitext.atomic import check_out
from blitext.cache import CachePlan, ShardWriter
from blitext.cache.jobs import run_sharded_job
from blitext.cache.quantise import STORES
from blitext.cache.verify import cache_info
from blitext.config import default_cache_root, provenance
from blitext.console import RateLimitedWarnings, progress_bar, rank_logger, say
from blitext.data.images import DRAFT_DECODING, load_image
from blitext.distributed import run_distributed
from blitext.errors import BadInputError, BlitextError
from blitext.features.plan import PlanItems, plan_items
from blitext.models.loading import load_vision_encoder
from blitext.models.registry import DEFAULT_VISION_ENCODER


DECODES = ("full", "draft")


@dataclass
class ExtractConfig:
    data: str = "easy-vqa"                # caption JSON / image folder / .tar shards, or a prepared dataset name
    out: str | None = None                # cache folder; default <cache root>/features/<data>__<encoder>
    vision_encoder: str = DEFAULT_VISION_ENCODER  # bundled name, local folder or HF id (paper: EVA ViT-g)
    image_root: str | None = None         # where relative image paths start; default the annotation's folder
    batch_size: int = 32                  # images per encoder forward
    shard_size: int = 1024                # rows per HDF5 shard; a kill loses at most one shard's work
    num_workers: int = 2                  # DataLoader decoding processes per rank
    dtype: str = "float16"                # what readers get (fp16: half the bytes, ample precision for features)
    store: str = "fp16"                   # fp16 = rows stored as `dtype`; int8 = int8 with a scale per row (half the bytes again)
    precision: str = "auto"               # encoder weights: auto = bf16 on GPU, fp32 on CPU
    device: str = "auto"
    max_pixels: int = 89_478_485          # larger images are refused as decompression bombs (PIL's limit)
    decode: str = "full"                  # full = every pixel, then the resize (the reference's); draft = JPEGs at 1/2-1/8 scale first (docs/guide.md)
    limit: int | None = None              # only the first N images (quick runs)

    def __post_init__(self) -> None:
        if self.decode not in DECODES:
            raise BlitextError(f"--decode {self.decode!r}: expected {' or '.join(DECODES)}")
        if self.store not in STORES:
            raise BlitextError(f"--store {self.store!r}: expected {' or '.join(STORES)}")
        if self.shard_size % self.batch_size:
            raise BlitextError(f"shard_size {self.shard_size} must be a multiple of batch_size {self.batch_size} "
                               "(batches never cross shards, so resumed runs repeat the same batches)")


class DecodedImages(Dataset):
    """Runs in DataLoader workers: (index, uint8 pixels or None, why it failed or None); the
    encoder's process normalises them (Preprocess.normalise). The items are columns (plan.py):
    forked workers share their pages instead of copying an object per image."""

    def __init__(self, items: PlanItems, preprocess, max_pixels: int, draft_size: tuple[int, int] | None = None):
        self.items, self.preprocess, self.max_pixels, self.draft_size = items, preprocess, max_pixels, draft_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            return i, self.preprocess.pixels(load_image(item.root, item.ref, self.max_pixels, self.draft_size)), None
        except BadInputError as e:
            return i, None, str(e)
        except Exception as e:  # a decoder bug on one file must not end a million-image run; it is recorded
            return i, None, f"{item.ref}: unexpected {type(e).__name__}: {e}"


def decoded_images(items: PlanItems, preprocess, config: ExtractConfig) -> DecodedImages:
    """The items as extract-features' workers decode them: at least `preprocess`'s size where
    config.decode is "draft"."""
    draft_size = preprocess.least_decoded_size if config.decode == "draft" else None
    return DecodedImages(items, preprocess, config.max_pixels, draft_size)


def collate_decoded(batch):
    ok = [(i, x) for i, x, _ in batch if x is not None]
    failed = [(i, why) for i, _, why in batch if why is not None]
    pixels = torch.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], pixels, failed


def shard_batches(plan: CachePlan, shards: list[int], batch_size: int) -> list[list[int]]:
    """Index batches shard by shard, so no batch crosses a shard boundary."""
    out = []
    for s in shards:
        r = plan.shard_range(s)
        out.extend(list(r[i:i + batch_size]) for i in range(0, len(r), batch_size))
    return out


def default_out(config: ExtractConfig) -> Path:
    slug = lambda s: re.sub(r"[^A-Za-z0-9._-]+", "-", Path(s).name if Path(s).exists() else s).strip("-")
    return default_cache_root() / "features" / f"{slug(config.data)}__{slug(config.vision_encoder)}"


def encoder_dtype(precision: str, device: str) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def extract_features(config: ExtractConfig) -> dict:
    """Run (or resume) one extraction; returns the cache summary. Call under torchrun for several ranks."""
    check_out(config.out)
    return run_distributed(config.device, lambda device, info: _extract(config, device, info))


def plan_storage(config: ExtractConfig) -> dict:
    """`extract-features --dry-run`: what the cache will take, from the encoder's row shape and
    the planned images' keys, before anything is written."""
    from blitext.cache.storage import estimated_row_bytes

    items = plan_items(config)
    encoder = load_vision_encoder(config.vision_encoder, device="cpu")
    shape = encoder.token_shape()
    stored = STORES[config.store] or config.dtype
    row_bytes = estimated_row_bytes(shape, stored, round(items.mean_key_bytes()))
    return {"images": len(items), "row_shape": list(shape), "dtype": config.dtype, "store": stored,
            "encoder": encoder.fingerprint, "bytes_per_row": row_bytes}


def _extract(config: ExtractConfig, device: str, info) -> dict:
    out = Path(config.out) if config.out else default_out(config)
    items = plan_items(config)
    encoder = load_vision_encoder(config.vision_encoder, device=device).to(encoder_dtype(config.precision, device))
    say(f"extract-features: {len(items):,} images -> {out} with {encoder.fingerprint} on {device}"
        + (f" ({info.world} ranks)" if info.world > 1 else ""))
    plan = CachePlan(out, "image-features", producer(encoder, config.decode), items.keys, config.shard_size,
                     config.dtype, store=STORES[config.store], provenance=provenance(config))
    return fill_cache(plan, info, lambda shards, warnings: _write_shards(
        plan, shards, items, encoder, config, device, warnings))


def producer(encoder, decode: str) -> dict:
    """The cache's producer: a draft-decoded cache records it, so it is never read as a full one."""
    made = encoder.producer()
    return {**made, "decoding": f"{made['decoding']}; {DRAFT_DECODING}"} if decode == "draft" else made


def fill_cache(plan: CachePlan, info, write) -> dict:
    """Run `write(shards, warnings)` on this rank's unfinished shards (finished ones are kept:
    resume); returns the cache's summary with the timing `write` reported."""
    def write_shards(shards: list[int], finished: int) -> dict:
        log = rank_logger("extract", plan.root / "logs")  # only now: the folder must be a cache before logs go in
        if finished:
            say(f"resuming: {finished} finished shard(s) kept, {len(shards)} to do")
        timing = write(shards, RateLimitedWarnings(log))
        log.info("timing: %s", timing)
        return timing

    timing = run_sharded_job(plan, info, write_shards)
    summary = {**cache_info(plan.root), "timing": timing}
    if info.is_main:
        print_failures(summary["failures"])
    return summary


def _write_shards(plan, shards, items, encoder, config, device, warnings) -> dict:
    """Encode and write this rank's pending shards."""
    batches = shard_batches(plan, shards, config.batch_size)
    loader = DataLoader(decoded_images(items, encoder.preprocess, config), batch_sampler=batches,
                        collate_fn=collate_decoded, num_workers=config.num_workers,
                        persistent_workers=False, pin_memory=device.startswith("cuda"))
    dtype = next(encoder.parameters()).dtype
    # an int8 store quantises float32 rows (numpy's fp32 -> int8 is fast; fp16 arithmetic is not)
    stored = torch.float32 if plan.quantised else getattr(torch, config.dtype)

    def encode(pixels: torch.Tensor):
        # to the stored dtype on the device: numpy's fp32 -> fp16 cast is 10-100x slower (far
        # slower still on values near fp16's subnormals) and made writing 87% of extraction time
        # on a GPU (bench/results/gpu_bench.json)
        inputs = encoder.preprocess.normalise(pixels.to(device, non_blocking=True)).to(dtype)
        return encoder(inputs).to(stored).cpu().numpy()  # (B, T, D)

    return write_batches(plan, shards, items, iter(loader), config.batch_size, encode, warnings, "img")


def write_batches(plan, shards, items, batches, batch_size: int, encode, warnings, unit: str) -> dict:
    """Write this rank's shards from decoded batches `(ok, inputs, failed)`: failures recorded with
    their reason, `encode(inputs)` rows stored under the ok items' keys."""
    total = sum(len(plan.shard_range(s)) for s in shards)
    start, in_encoder, in_data, in_write = time.perf_counter(), 0.0, 0.0, 0.0
    with progress_bar(total, "extract-features", unit) as advance, torch.inference_mode():
        for s in shards:
            with ShardWriter(plan, s) as writer:
                for _ in range(-(-len(plan.shard_range(s)) // batch_size)):
                    t = time.perf_counter()
                    ok, inputs, failed = next(batches)
                    in_data += time.perf_counter() - t
                    for i, why in failed:
                        writer.fail(items[i].key, items[i].ref, why)
                        warnings.warn(why)
                    if ok:
                        t = time.perf_counter()
                        rows = encode(inputs)
                        in_encoder += time.perf_counter() - t
                        t = time.perf_counter()
                        writer.add([items[i].key for i in ok], rows)
                        in_write += time.perf_counter() - t
                    advance(len(ok) + len(failed), status=f"shard {s}")
    # where the time went: waiting for decoded batches, the encoder (with the copy back), writing rows
    return {"items": total, "seconds": time.perf_counter() - start, "encoder_seconds": in_encoder,
            "data_wait_seconds": in_data, "write_seconds": in_write}


def print_failures(failures: list[dict]) -> None:
    if not failures:
        return
    reasons = collections.Counter(_reason_kind(f["reason"]) for f in failures)
    say(f"[yellow]{len(failures)} input(s) could not be used[/] (listed in manifest.json under 'failed'): "
        + ", ".join(f"{n} {why}" for why, n in reasons.most_common()))


def _reason_kind(reason: str) -> str:
    return reason.split(": ", 1)[-1].split(" (")[0][:60]
