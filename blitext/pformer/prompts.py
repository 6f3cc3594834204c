"""Stage 0, its second half: `blitext build-prompts` - the P-Former's reference prompt for every caption, cached.

Compact by default: the cache stores each caption's [CLS] bottleneck (d_enc numbers) and the
P-Former's head weights beside it; `PromptCache` rebuilds the n_prompt x d_llm prompt on read.
`--store full` stores the prompts themselves. The reader returns the same tensor either way.
Rows are keyed by caption id (`<image_id>#<k>`), so adaptor trainers join them to features.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from blitext.atomic import check_out, read_json
from blitext.cache import CachePlan, FeatureCache, ShardWriter
from blitext.cache.manifest import PROMPT_KINDS
from blitext.cache.jobs import run_sharded_job
from blitext.cache.verify import cache_info
from blitext.checkpoint import latest_checkpoint, load_weights
from blitext.config import default_cache_root, provenance
from blitext.console import progress_bar, say
from blitext.data.pairs import EVERY_ID, read_pairs
from blitext.data.text import expand_paths, first_repeat, read_sentences
from blitext.distributed import run_distributed
from blitext.errors import BlitextError
from blitext.models.fingerprint import fingerprint
from blitext.models.llm import CAUSAL
from blitext.models.loading import load_text_encoder
from blitext.models.pformer import PFormer

HEAD = "head.safetensors"  # the P-Former head saved inside a compact cache
HEAD_PREFIXES = ("cls_proj.", "pooler.", "llm_proj.")


@dataclass
class LoadedPFormer:
    model: PFormer
    tokenizer: object
    state: dict        # the checkpoint's state.json: llm, text_encoder, fingerprints, config
    fingerprint: str
    path: Path

    @property
    def llm_fingerprint(self) -> str:
        return self.state["llm_fingerprint"]


def pformer_folder(path: str | Path) -> Path:
    """A P-Former checkpoint folder: `<run>/final`, a `checkpoints/step-N`, or a run folder."""
    path = Path(path)
    for candidate in (path, path / "final", latest_checkpoint(path) if path.is_dir() else None):
        if candidate is not None and (candidate / "model.safetensors").is_file() and (candidate / "state.json").is_file():
            return candidate
    raise BlitextError(f"--pformer {str(path)!r} holds no P-Former (model.safetensors + state.json); "
                       f"pass the folder train-pformer wrote (its run folder or <run>/final)")


def load_pformer(path: str | Path, device: str = "cpu") -> LoadedPFormer:
    folder = pformer_folder(path)
    state = read_json(folder / "state.json")
    encoder = load_text_encoder(state["text_encoder"], device=device)
    if encoder.fingerprint.split("@")[1] != state["text_encoder_fingerprint"].split("@")[1]:
        raise BlitextError(f"{folder} was trained from {state['text_encoder_fingerprint']} but "
                           f"{state['text_encoder']!r} here is {encoder.fingerprint}: provide the same text encoder")
    model = PFormer(encoder.model, state["d_llm"], state["n_prompt"], state["contrast_dim"])
    missing, unexpected = model.load_state_dict(load_weights(folder, state), strict=False)
    if missing or unexpected:
        raise BlitextError(f"{folder}/model.safetensors does not fit a P-Former: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    name = f"pformer-{folder.parent.name if folder.name == 'final' else folder.name}"
    return LoadedPFormer(model.to(device).eval(), encoder.tokenizer, state,
                         fingerprint(name, folder / "model.safetensors"), folder)


@dataclass
class BuildPromptsConfig:
    pformer: str = ""                   # train-pformer's run folder, <run>/final or a checkpoint
    captions: list[str] = field(default_factory=list)  # caption files as train-adapter reads them (ids <image_id>#k), or text
    out: str | None = None              # default <cache root>/prompts/<captions>__<pformer>
    store: str = "compact"              # compact: [CLS] + head weights; full: n_prompt x d_llm prompts
    batch_size: int = 256
    shard_size: int = 8192              # captions per shard
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.store not in ("compact", "full"):
            raise BlitextError(f"--store must be 'compact' or 'full', got {self.store!r}")
        if isinstance(self.captions, str):
            self.captions = [self.captions]
        if self.shard_size % self.batch_size:
            raise BlitextError(f"shard_size {self.shard_size} must be a multiple of batch_size {self.batch_size}")


def prompt_producer(pformer: LoadedPFormer, store: str) -> dict:
    producer = {"pformer": pformer.fingerprint, "llm": pformer.llm_fingerprint, "store": store,
                "n_prompt": pformer.model.n_prompt, "d_llm": pformer.model.d_llm,
                "max_text_len": pformer.state["config"]["max_text_len"]}
    family = pformer.state.get("llm_family", CAUSAL)  # P-Formers from before T5 support: causal
    # recorded only when not causal, so a causal cache's producer stays what it was before T5 support
    return producer if family == CAUSAL else {**producer, "llm_family": family}


def default_prompts_out(config: BuildPromptsConfig, pformer: LoadedPFormer) -> Path:
    first = Path(config.captions[0])
    data = first.parent.name if first.name.startswith("captions") else first.stem
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{data}__{pformer.fingerprint.split('@')[0]}")
    return default_cache_root() / "prompts" / slug


def build_prompts(config: BuildPromptsConfig) -> dict:
    """Write (or resume) a prompt cache; returns its summary. Runs under torchrun too."""
    check_out(config.out)
    return run_distributed(config.device, lambda device, info: _build(config, device, info))


def _build(config: BuildPromptsConfig, device: str, info) -> dict:
    if not config.pformer or not config.captions:
        raise BlitextError("build-prompts needs --pformer RUN and --captions FILE")
    pformer = load_pformer(config.pformer, device)
    ids, texts = read_captions(config.captions)
    repeat = first_repeat(ids)
    if repeat is not None:
        raise BlitextError(f"caption id {repeat!r} repeats in {', '.join(config.captions)}; each caption needs its own id")
    out = Path(config.out) if config.out else default_prompts_out(config, pformer)
    say(f"build-prompts: {len(ids):,} captions -> {out} ({config.store}) with {pformer.fingerprint}")
    plan = CachePlan(out, "prompts", prompt_producer(pformer, config.store), ids, config.shard_size,
                     "float32", provenance={**provenance(config), "llm": pformer.state["llm"]})  # full rows in fp32 too: both stores read back equal

    def write_shards(shards: list[int], finished: int) -> None:
        if finished:
            say(f"resuming: {finished} finished shard(s) kept, {len(shards)} to do")
        if info.is_main and config.store == "compact":
            save_head(pformer.model, out / HEAD)
        _write_prompt_shards(plan, shards, texts, pformer, config, device)

    run_sharded_job(plan, info, write_shards)
    return cache_info(out)


def read_captions(paths: list[str]) -> tuple[Sequence[str], Sequence[str]]:
    """(ids, texts) to make prompts of. Caption datasets are read as train-adapter reads them
    (read_pairs: ids <image_id>#k, row by row where the format allows, into columns mapped from
    the cache root), so the prompt cache's keys are the pairs' by construction; text files line
    by line (ids <file>:<line>)."""
    files = expand_paths(paths)
    text = [path for path in files if _is_text_file(path)]
    if not text:
        pairs = read_pairs([str(path) for path in files], None, lambda image_id: True, EVERY_ID)
        return pairs.keys, pairs.texts
    if len(text) < len(files):
        raise BlitextError(f"--captions mixes text files ({text[0]}) with caption datasets; make prompts of each "
                           f"kind in its own build-prompts run")
    corpus = read_sentences([str(path) for path in files])
    return corpus.ids, corpus.sentences


def _is_text_file(path: Path) -> bool:
    """Sentences, not a caption dataset: neither .json, .csv nor .tar, and if .jsonl, its first
    row names no image."""
    suffix = path.suffix.lower()
    if suffix in (".json", ".csv", ".tar"):
        return False
    if suffix != ".jsonl":
        return True
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"null")
    try:
        row = json.loads(first)
    except ValueError:
        return True  # read_sentences names the bad line
    return not (isinstance(row, dict) and "image" in row)


def save_head(model: PFormer, path: Path) -> None:
    head = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIXES)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(head, tmp, metadata={"n_prompt": str(model.n_prompt)})
    tmp.replace(path)


@torch.inference_mode()
def _write_prompt_shards(plan, shards, sentences: Sequence[str], pformer: LoadedPFormer, config, device) -> None:
    """`sentences[i]` is the text of `plan.keys[i]` (the plan keeps the corpus's order): no dict
    from key to text, which would cost every rank tens of bytes more per caption."""
    max_len = pformer.state["config"]["max_text_len"]
    total = sum(len(plan.shard_range(s)) for s in shards)
    with progress_bar(total, "build-prompts", "capt") as advance:
        for s in shards:
            r = plan.shard_range(s)
            with ShardWriter(plan, s) as writer:
                for start in range(r.start, r.stop, config.batch_size):
                    stop = min(start + config.batch_size, r.stop)
                    keys = plan.keys[start:stop]
                    enc = pformer.tokenizer(sentences[start:stop], padding=True, truncation=True,
                                            max_length=max_len, return_tensors="pt").to(device)
                    cls = pformer.model.encode(enc.input_ids, enc.attention_mask).float()   # (B, d_enc)
                    rows = cls if config.store == "compact" else pformer.model.head(cls)     # (B, P, d_llm)
                    writer.add(keys, rows.cpu().numpy())
                    advance(len(keys))


class PromptCache:
    """Reference prompts by caption key: (n_prompt, d_llm) float tensors, from either store."""

    def __init__(self, root: str | Path, expect: dict | None = None):
        self.root = Path(root)
        fix = "re-run build-prompts with this run's P-Former and LLM, or pass the matching --prompts"
        self.cache = FeatureCache(self.root, expect=expect, fix=fix, kinds=PROMPT_KINDS)
        self.store = self.cache.producer["store"]
        self.head = self._load_head() if self.store == "compact" else None

    def _load_head(self) -> torch.nn.Module:
        p = self.cache.producer
        weights = load_file(self.root / HEAD)
        d_enc = weights["llm_proj.weight"].shape[1]
        head = _Head(d_enc, p["n_prompt"], p["d_llm"])
        head.load_state_dict(weights)
        return head.eval()

    @property
    def producer(self) -> dict:
        return self.cache.producer

    def require_llm(self, llm_fingerprint: str, family: str, llm: str) -> None:
        """Refuse prompts a P-Former made for another LLM, in one line naming the cache and the fix:
        the prompts live in that LLM's embedding space (and, across families, were learnt through
        another way of reading them)."""
        made, made_family = self.producer["llm"], self.producer.get("llm_family", CAUSAL)
        if made == llm_fingerprint:
            return
        article = "an" if made_family[0] in "aeiou" else "a"
        kinds = f" ({article} {made_family} LLM; this run's is {family})" if made_family != family else ""
        raise BlitextError(f"the prompts in {self.root} were built for {made}{kinds}, but this run's LLM is "
                           f"{llm_fingerprint}: build prompts with a P-Former trained for --llm {llm}, or pass "
                           f"--llm matching the prompts")

    @property
    def keys(self) -> list[str]:
        return self.cache.keys

    def __len__(self) -> int:
        return len(self.cache)

    def __contains__(self, key: str) -> bool:
        return key in self.cache

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.get_batch([key])[0]

    @torch.no_grad()  # not inference_mode: the rows are constants inside a loss that is differentiated
    def get_batch(self, keys: list[str]) -> torch.Tensor:
        """(B, n_prompt, d_llm) float32, with no gradient: references are constants."""
        return self.expand(self.rows(keys))

    def rows(self, keys: list[str]) -> torch.Tensor:
        """The stored rows alone (I/O only: a trainer's prefetch thread reads these)."""
        return torch.from_numpy(np.stack(self.cache.get_many(keys))).float()

    def expand(self, rows: torch.Tensor) -> torch.Tensor:
        """Stored rows -> prompts. Compact rows run the P-Former's head: trainers call this on their
        own thread, since matmuls on two threads at once add in a varying order (runs would differ)."""
        return rows if self.head is None else self.head(rows)


class _Head(torch.nn.Module):
    """The P-Former's head alone (same names and maths as PFormer.head), to rebuild compact rows."""

    def __init__(self, d_enc: int, n_prompt: int, d_llm: int):
        super().__init__()
        self.n_prompt, self.d_enc = n_prompt, d_enc
        self.cls_proj = torch.nn.Linear(d_enc, n_prompt * d_enc)
        self.pooler = torch.nn.Sequential(torch.nn.Linear(d_enc, d_enc), torch.nn.Tanh())
        self.llm_proj = torch.nn.Linear(d_enc, d_llm)

    forward = PFormer.head


# ---------------------------------------------------------------- sources for check-prompts

@torch.inference_mode()
def prompts_from_pformer(path: str | Path, captions: list[str], limit: int) -> tuple[list[str], torch.Tensor, str]:
    """(ids, prompts (N, P, d_llm), LLM name) for the first `limit` captions."""
    pformer = load_pformer(path)
    ids, texts = read_captions(captions)
    ids, texts = ids[:limit], texts[:limit]
    enc = pformer.tokenizer(texts, padding=True, truncation=True, max_length=pformer.state["config"]["max_text_len"],
                            return_tensors="pt")
    return ids, pformer.model(enc.input_ids, enc.attention_mask).prompts, pformer.state["llm"]


def prompts_from_cache(path: str | Path, limit: int) -> tuple[list[str], torch.Tensor, str]:
    cache = PromptCache(path)
    ids = cache.keys[:limit]
    return ids, cache.get_batch(ids), cache.cache.manifest["provenance"]["llm"]
