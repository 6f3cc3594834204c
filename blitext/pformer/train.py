"""Stage 0: `blitext train-pformer` - learn, from text alone, the ideal soft prompt of a sentence.

Follows docs/method.md#stage-0-the-p-former: loss = L_lm + L_contrast + L_vocab against a frozen LLM, 25%
of the encoder's input tokens masked, two-view SimCSE by default (the authors' one-view
variant as an option), AdamW with linear warm-up and cosine decay; paper values as defaults.

Launch on several processes with `torchrun --nproc_per_node N --no-python blitext train-pformer ...`;
`batch_size` is the global batch, split across ranks, with contrastive negatives gathered
from every rank. Every step's randomness is a function of (seed, step, rank), so
`--resume latest` replays exactly the steps an uninterrupted run would have taken.
The sentences and their held-out split are read once per machine into files under the cache
root and memory-mapped by every rank (`read_split`, sentence_store.py), not held by each.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from blitext.atomic import check_out
from blitext.caption_counts import CaptionCounts
from blitext.config import TrainerFields, default_cache_root, provenance, to_jsonable
from blitext.console import say
from blitext.data import sentence_store
from blitext.data.columns import GatherColumn, StringColumn
from blitext.data.sentence_store import Split
from blitext.data.text import TextCorpus, expand_paths, first_copies, read_sentences, sorted_distinct_at
from blitext.distributed import run_distributed
from blitext.errors import BlitextError
from blitext.loop import RunOptions, TrainerLoop, finish_run, resume_run
from blitext.losses import TEMP_MAX, TEMP_MIN, contrastive_loss, vocab_loss
from blitext.metrics.llm import teacher_forced_accuracy
from blitext.models.llm import FrozenLLM, LMBatch
from blitext.models.loading import load_llm, load_text_encoder
from blitext.models.pformer import PFormer
from blitext.training import (adamw, global_batch, lr_at, open_run, rank_slice, require_batch_splits, set_lr,
                              step_generator, step_seed, tracking)


@dataclass
class PFormerConfig(RunOptions, TrainerFields):
    text: list[str] = field(default_factory=list)  # sentence files: plain text, .jsonl, caption .json; globs
    n_prompt: int = 32                  # soft prompts per sentence (paper: 32, as BLIP-2's queries)
    mask_prob: float = 0.25             # denoising: share of encoder input tokens replaced by [MASK]
    contrast: str = "two-view"          # "two-view" SimCSE (paper) or "one-view" (authors' code: positive = itself)
    contrast_dim: int = 256
    temp: float = 0.07                  # initial learnable contrastive temperature
    label_smoothing: float = 0.1
    w_lm: float = 1.0
    w_contrast: float = 1.0
    w_vocab: float = 1.0
    epochs: int = 5                     # paper: 5 epochs of 12M LAION sentences
    batch_size: int = 384               # global batch (paper: 384), split across ranks
    warmup_steps: int = 2000
    heldout: int = 64                   # sentences kept out of training, for samples and accuracy
    sample_every: int = 500             # steps between printed greedy reconstructions
    n_samples: int = 3
    bad_bytes: str = "error"            # undecodable text: "error" names file and line, "replace" counts them

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.contrast not in ("two-view", "one-view"):
            raise BlitextError(f"contrast must be 'two-view' or 'one-view', got {self.contrast!r}")
        if isinstance(self.text, str):
            self.text = [self.text]


# What must not change between a run and its resume (the rest, e.g. sample_every, may).
RESUME_KEYS = ("llm", "text_encoder", "n_prompt", "max_text_len", "end_of_text", "mask_prob", "contrast",
               "batch_size", "lr", "min_lr", "warmup_steps", "seed", "epochs", "max_steps", "heldout", "max_grad_norm")


def split_corpus(corpus: TextCorpus, heldout: int, seed: int) -> Split:
    """`heldout` distinct sentences (chosen by seed) are kept out of training, every copy of them:
    the seed's permutation of sorted(set(sentences)), found without holding that set (text.py);
    the training sentences are the corpus's columns seen through an index (8 B per sentence)."""
    sentences = corpus.sentences
    distinct = first_copies(sentences)
    if len(distinct) <= heldout:
        raise BlitextError(f"only {len(distinct)} distinct sentences for heldout={heldout}; "
                           f"pass a smaller --heldout or more text")
    order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed))[:heldout].tolist()
    held = sorted_distinct_at(sentences, distinct, order)
    train = np.flatnonzero(~_copies_of(sentences, set(held)))
    return Split(GatherColumn(corpus.ids, train), GatherColumn(sentences, train), held, corpus.counts)


def read_split(text: list[str], bad_bytes: str, heldout: int, seed: int) -> Split:
    """The sentences of `text` split by split_corpus, read once per machine into files under the
    cache root and memory-mapped by every rank (sentence_store.py), or in memory where the cache
    root cannot be written."""
    made_from = sentence_store.inputs(expand_paths(text), bad_bytes, heldout, seed)
    return sentence_store.stored_split(made_from, lambda: split_corpus(read_sentences(text, bad_bytes), heldout, seed))


def _copies_of(sentences: StringColumn, held: set[str]) -> np.ndarray:
    """True where a sentence is one of `held` (its length and then its text compared)."""
    lengths = np.diff(sentences.offsets)
    maybe = np.flatnonzero(np.isin(lengths, [len(s.encode()) for s in held]))
    out = np.zeros(len(sentences), bool)
    out[maybe] = [sentences[i] in held for i in maybe.tolist()]
    return out


class Batcher:
    """Tokenises sentences for the encoder (masked) and as the frozen LLM's targets, counting the
    ones each cuts to max_text_len into `counts`."""

    def __init__(self, enc_tokenizer, llm: FrozenLLM, config: PFormerConfig, counts: CaptionCounts | None = None):
        self.enc, self.llm, self.config = enc_tokenizer, llm, config
        self.counts = counts or CaptionCounts(config.max_text_len)

    @property
    def truncated(self) -> Counter:
        """Texts cut so far, per tokenizer: "encoder" and "target"."""
        return self.counts.cut

    def encoder_inputs(self, texts: list[str]) -> dict:
        t = self.enc(texts, padding=True, truncation=True, max_length=self.config.max_text_len,
                     return_tensors="pt", return_special_tokens_mask=True, return_overflowing_tokens=False)
        self.counts.count_tokens("encoder", self.enc, texts)
        return t

    def targets(self, texts: list[str], generator: torch.Generator | None = None) -> LMBatch:
        """The LLM's targets. With a generator, a training step's: an encoder-decoder LLM reads a random
        first part of each sentence and learns the rest, as the authors' pformer_t5. Without one, the
        whole sentences after the prompts alone (held-out accuracy)."""
        c = self.config
        if generator is None:
            batch = self.llm.lm_batch(texts, c.end_of_text, c.max_text_len)
        else:
            draws = torch.rand(len(texts), generator=generator)
            batch = self.llm.training_batch(texts, draws, c.end_of_text, c.max_text_len, longer_prefix=True)
        self.counts.count_cut("target", batch.truncated)
        return batch

    def masked(self, t: dict, generator: torch.Generator) -> torch.Tensor:
        """input_ids with mask_prob of the real, non-special tokens replaced by [MASK]."""
        candidates = t["attention_mask"].bool() & ~t["special_tokens_mask"].bool()
        chosen = (torch.rand(t["input_ids"].shape, generator=generator) < self.config.mask_prob) & candidates
        return t["input_ids"].masked_fill(chosen, self.enc.mask_token_id)


def total_steps(config: PFormerConfig, n_train: int) -> int:
    if config.max_steps:
        return config.max_steps
    return max(1, config.epochs * (n_train // config.batch_size))


def default_run_dir(config: PFormerConfig) -> Path:
    return default_cache_root() / "runs" / "pformer" / Path(config.llm).name


def train_pformer(config: PFormerConfig) -> Path:
    """Train (or resume) a P-Former; returns the folder of the final weights (`<run>/final`)."""
    check_out(config.out)
    return run_distributed(config.device, lambda device, info: _train(config, device, info))


def _train(config: PFormerConfig, device: str, info) -> Path:
    if not config.text:
        raise BlitextError("train-pformer needs sentences: pass --text FILE (plain text, .jsonl or caption .json)")
    require_batch_splits(config.batch_size, info.world * config.accum_steps)
    run = Path(config.out) if config.out else default_run_dir(config)
    split = read_split(config.text, config.bad_bytes, config.heldout, config.seed)
    if len(split.train) < config.batch_size:
        raise BlitextError(f"{len(split.train)} training sentences < batch_size {config.batch_size}; lower --batch-size")
    llm = load_llm(config.llm, device=device)
    if config.grad_checkpointing:
        llm.checkpoint_layers()
    text_encoder = load_text_encoder(config.text_encoder, device=device)
    if text_encoder.tokenizer.mask_token_id is None:
        raise BlitextError(f"text encoder {config.text_encoder!r} has no [MASK] token; use a BERT-family encoder")
    d_llm = llm.width
    torch.manual_seed(config.seed)  # the new head's initialisation
    pformer = PFormer(text_encoder.model, d_llm, config.n_prompt, config.contrast_dim, config.temp).to(device)
    optimizer = adamw(pformer.parameters(), config.lr, config.weight_decay)
    identity = {"llm_fingerprint": llm.fingerprint, "text_encoder_fingerprint": text_encoder.fingerprint,
                "resume_config": {k: getattr(config, k) for k in RESUME_KEYS}}
    start, resumed = resume_run(run, config, pformer, optimizer, identity)
    model = DistributedDataParallel(pformer) if info.world > 1 else pformer
    steps = total_steps(config, len(split.train))
    say(f"train-pformer: {len(split.train):,} sentences ({split.counts['empty skipped']} empty lines skipped), "
        f"{steps:,} steps of {config.batch_size}, {pformer.n_prompt} prompts -> {llm.fingerprint} on {device}")
    metrics, log = open_run(run, info, start, "train-pformer", config)
    counts = CaptionCounts(config.max_text_len, split.counts["rows without caption"], resumed)
    batcher = Batcher(text_encoder.tokenizer, llm, config, counts)
    state = {**identity, "config": to_jsonable(config), "text_encoder": config.text_encoder, "llm": config.llm,
             "llm_family": llm.family, "n_prompt": config.n_prompt, "d_llm": d_llm, "contrast_dim": config.contrast_dim,
             "provenance": provenance(config), "corpus_counts": dict(split.counts)}
    loop = TrainLoop(config, model, pformer, llm, optimizer, batcher, split, device, info, metrics, log)
    with tracking(metrics):
        loop.run(start, steps, run, optimizer, state)
        if steps % config.sample_every or steps == start:  # not twice for the last step
            loop.show_samples(steps)
    return finish_run(run, steps, pformer, loop.checkpoint_state(state), info)


class TrainLoop(TrainerLoop):
    title, unit, rate_name = "train-pformer", "sent", "sentences_per_s"

    def __init__(self, config, model, pformer, llm, optimizer, batcher, split, device, info, metrics, log):
        super().__init__(config, pformer, device, info, metrics, log)
        self.forward, self.pformer, self.llm = model, pformer, llm  # model: DDP-wrapped on several ranks
        self.optimizer, self.batcher, self.split = optimizer, batcher, split
        self.embedding = llm.embedding_table  # (V, d_llm), frozen codebook
        self.captions = batcher.counts

    def record_fields(self, step: int) -> dict:
        return {"temp": float(self.pformer.temp.detach())}

    def after_step(self, step: int, steps: int) -> None:
        if (step + 1) % self.c.sample_every == 0:
            self.show_samples(step + 1)

    def train_step(self, step: int, steps: int, batch=None) -> dict[str, float]:
        c = self.c
        set_lr(self.optimizer, lr_at(step, steps, c.lr, c.min_lr, c.warmup_steps, c.warmup_start_lr))
        texts = [self.split.train[i] for i in global_batch(step, len(self.split.train), c.batch_size, c.seed)]
        enc = self.batcher.encoder_inputs(texts)
        generator = step_generator(c.seed, step)
        masked = self.batcher.masked(enc, generator)                              # (B_global, L)
        # the global batch too: truncations counted (and T5's split words drawn) for every rank's sentences
        targets = self.batcher.targets(texts, generator)
        torch.manual_seed(step_seed(c.seed, step, self.info.rank))                # dropout of this step

        def micro():  # the micro-batch is slice self.rank of self.world of the global batch
            rows = rank_slice(list(range(len(texts))), self.rank, self.world)
            ids, att = masked[rows].to(self.device), enc["attention_mask"][rows].to(self.device)
            losses = self.losses(ids, att, targets.rows(rows).to(self.device))
            return losses, c.w_lm * losses["lm"] + c.w_contrast * losses["contrast"] + c.w_vocab * losses["vocab"]

        def lm_tokens():
            return targets.rows(rank_slice(list(range(len(texts))), self.info.rank, self.info.world)).loss_mask.sum()
        logged = self.accumulated(micro, (), lm_tokens, self.forward, c.max_grad_norm)
        with torch.no_grad():  # as BLIP: a clamp only inside the loss would leave temp stuck past a bound
            self.pformer.temp.clamp_(TEMP_MIN, TEMP_MAX)
        return logged  # what is logged is the global batch's, not rank 0's

    def losses(self, ids, att, tgt: LMBatch) -> dict[str, torch.Tensor]:
        b = ids.shape[0]
        two_view = self.c.contrast == "two-view"
        if two_view:  # SimCSE: the same sentences twice in one pass; dropout makes the two views differ
            ids, att = torch.cat([ids, ids]), torch.cat([att, att])
        out = self.forward(ids, att)
        prompts = out.prompts[:b]                                                 # (B, P, d_llm)
        z_a = out.text_feat[:b]
        z_b = out.text_feat[b:] if two_view else z_a
        return {
            "lm": self.llm.lm_loss(prompts, tgt) * self.token_share(tgt.loss_mask),
            "contrast": contrastive_loss(z_a, z_b, self.pformer.temp, self.c.label_smoothing),
            "vocab": vocab_loss(prompts, self.embedding),
        }

    @torch.no_grad()
    def show_samples(self, step: int) -> None:
        if not self.info.is_main:
            return
        self.pformer.eval()
        texts = self.split.heldout
        enc = self.batcher.encoder_inputs(texts)
        prompts = self.pformer(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)).prompts
        accuracy = teacher_forced_accuracy(self.llm, prompts, self.batcher.targets(texts).to(self.device))
        shown = generate_from_prompts(self.llm, prompts[:self.c.n_samples], self.c.end_of_text, self.c.max_text_len)
        self.pformer.train()
        lines = [f"  [dim]{t!r}[/] -> {g!r}" for t, g in zip(texts, shown)]
        say(f"step {step}: held-out token accuracy {accuracy:.3f}\n" + "\n".join(lines))
        self.log.info("step %d heldout_token_accuracy %.4f samples %s", step, accuracy, list(zip(texts, shown)))
        if self.metrics is not None:
            self.metrics.write({"step": step - 1, "heldout_token_accuracy": accuracy, "samples": list(zip(texts, shown))})


@torch.no_grad()
def generate_from_prompts(llm: FrozenLLM, prompts: torch.Tensor, end_of_text: str, max_new_tokens: int) -> list[str]:
    """Greedy text the frozen LLM writes from soft prompts alone, cut where it stops."""
    return llm.generate(prompts, [""] * len(prompts), end_of_text, max_new_tokens)
