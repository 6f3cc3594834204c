"""Stages 1 and 2: `blitext train-adapter` - BLIP-2's Q-Former, stages 1 and 2, from the caches.

Stage 1 = ITC + ITM + ITG + w1 * L_align (the LLM never runs: only `llm_proj` and the reference prompts
are needed); stage 2 = the frozen LLM's loss on caption + end-of-text (an encoder-decoder LLM: BLIP-2's
prefix LM, the caption split at a random word, the first part into T5's encoder, the rest its decoder's
target) + w2 * L_align, from stage 1's Q-Former and `llm_proj` (`--init`). See
docs/method.md#stage-1-itc-itm-itg-and-alignment and docs/method.md#stage-2-language-modelling-and-alignment;
w1 = 10, w2 = 100 as the paper; `--w-align 0` is plain BLIP-2 on the same path.

Training reads cached visual tokens (extract-features) by image id and cached reference prompts (build-prompts) by
caption key, never images; `--online` runs the frozen vision encoder on the images inside the loop instead, as the
reference code does. A cache from another encoder, preprocessing, P-Former or LLM than the run's is refused.

`batch_size` is the global batch, split across torchrun ranks; ITC negatives and ITM hard negatives come from the
whole global batch. Randomness is a function of (seed, step, rank), so `--resume latest` continues exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from blitext.atomic import check_out
from blitext.adapter.common import StepLosses, alignment, caption_record, prompt_cache, require_align_loss
from blitext.cache import FeatureCache
from blitext.caption_counts import CaptionCounts
from blitext.config import TrainerFields, default_cache_root, provenance, to_jsonable
from blitext.console import say
from blitext.data.pairs import CachedFeatures, OnlineFeatures, Pairs, default_captions, read_pairs
from blitext.distributed import run_distributed
from blitext.errors import BlitextError
from blitext.losses import TEMP_MAX, TEMP_MIN, itc_loss, itg_loss, itm_loss, itm_negatives
from blitext.models.adapter_checkpoint import adapter_weights, load_init
from blitext.models.fingerprint import fingerprint
from blitext.models.loading import (display_name, llm_family, llm_path, llm_width, load_llm, load_text_encoder,
                                    load_vision_encoder)
from blitext.models.qformer import QFormer, keep_first_layers, qformer_tokenizer, unilm_mask
from blitext.models.registry import DEFAULT_VISION_ENCODER
from blitext.loop import RunOptions, TrainerLoop, finish_run, resume_run
from blitext.pformer.prompts import PromptCache
from blitext.pformer.train import PFormerConfig
from blitext.training import (adamw, global_batch, llm_proj_groups, lr_at, open_run, rank_slice, require_batch_splits,
                              set_lr, step_generator, step_seed, tracking)


@dataclass
class AdapterConfig(RunOptions, TrainerFields):
    stage: int = 1                      # 1: ITC + ITM + ITG (+ w1 L_align); 2: frozen-LLM loss (+ w2 L_align)
    features: str | None = None         # feature cache from extract-features (not needed with --online)
    prompts: str | None = None          # reference prompts from build-prompts; needed when w_align > 0
    captions: list[str] = field(default_factory=list)  # caption JSON; default: the features' prepared data, train split
    w_align: float | None = None        # alignment weight; default 10 in stage 1, 100 in stage 2 (paper)
    align_loss: str = "mse"             # mse (paper) | centred: shared and per-image parts, each over its size |
                                        # contrastive: MSE over the references' spread + InfoNCE over the batch
    align_contrast_weight: float = 8.0  # contrastive: the InfoNCE term's weight beside the normalised MSE (4: 0.32,
                                        # 8: 0.42, 16: 0.44 exact captions from alignment alone, docs/results.md)
    align_contrast_temp: float = 0.05   # contrastive: the InfoNCE temperature (cosines of centred prompts)
    align_negatives: int = 0            # contrastive: references (evenly spaced over the captions, fixed) added to
                                        # every step's InfoNCE candidates beside the batch's own
    init: str | None = None             # a run (stage 2: its stage 1) or released BLIP-2 weights to start from
    align_steps: int = 0                # steps of L_align alone (no other loss, no LLM) before the stage's own
                                        # losses, fresh AdamW moments after them: the video path's order (paper: 0)
    align_lr: float | None = None       # the L_align-alone steps' peak rate (default: lr)
    align_max_grad_norm: float | None = None  # the L_align-alone steps' gradient-norm clip (default: max_grad_norm)
    online: bool = False                # encode the images inside the loop (no feature cache)
    vision_encoder: str | None = None   # default: the features cache's encoder; --online: the bundled one
    image_root: str | None = None       # --online: where relative image paths start
    n_prompt: int | None = None         # soft prompts = Q-Former queries; default: the prompt cache's, else the P-Former's default (paper: 32)
    cross_attention_frequency: int = 2  # a cross-attention to the visual tokens every N layers (paper: 2)
    num_layers: int | None = None       # keep the text encoder's first N layers (default: all; bert-base: 12)
    dropout: float | None = None        # the Q-Former's hidden and attention dropout (default: the encoder's, 0.1)
    embed_dim: int = 256
    temp: float = 0.07
    label_smoothing: float = 0.1
    epochs: int = 10
    batch_size: int = 1024              # global batch (paper), split across ranks
    llm_proj_lr_scale: float = 1.0      # llm_proj's rate / lr (paper: one rate); small-batch stage 2 needs more
    warmup_steps: int | None = None     # default 5000 (stage 1) / 2000 (stage 2), as the paper
    prefetch: int = 2                   # batches read ahead in a background thread
    decode_threads: int = 2             # --online: image decoding threads

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage not in (1, 2):
            raise BlitextError(f"--stage must be 1 or 2, got {self.stage}")
        if isinstance(self.captions, str):
            self.captions = [self.captions]
        if self.w_align is None:
            self.w_align = 10.0 if self.stage == 1 else 100.0
        if self.warmup_steps is None:
            self.warmup_steps = 5000 if self.stage == 1 else 2000
        if self.w_align < 0:
            raise BlitextError(f"--w-align must be >= 0, got {self.w_align}")
        if self.w_align > 0 and not self.prompts:
            raise BlitextError(f"--w-align {self.w_align:g} needs reference prompts: pass --prompts CACHE "
                               f"(blitext build-prompts makes it), or --w-align 0 for plain BLIP-2")
        require_align_loss(self.align_loss)
        if self.align_negatives < 0 or (self.align_negatives and self.align_loss != "contrastive"):
            raise BlitextError(f"--align-negatives {self.align_negatives}: a count >= 0 of extra InfoNCE candidates, "
                               f"only with --align-loss contrastive")
        if self.stage == 1 and self.accum_steps > 1:
            raise BlitextError("--accum-steps applies to stage 2: stage 1's ITC and ITM draw their negatives from the "
                               "whole batch, and accumulation would draw them from each micro-batch (a smaller "
                               "contrastive batch); use more ranks or a smaller --batch-size for stage 1")
        if self.align_steps < 0 or (self.align_steps and self.w_align == 0):
            raise BlitextError(f"--align-steps {self.align_steps} trains L_align alone: it needs --w-align above 0 "
                               f"and --prompts, and cannot be negative")
        if self.max_steps is not None and self.max_steps + self.align_steps < 1:
            raise BlitextError(f"--max-steps {self.max_steps} leaves nothing to train: pass a positive --max-steps "
                               f"(or --align-steps)")
        if not self.online and not self.features:
            raise BlitextError("train-adapter reads cached features: pass --features CACHE "
                               "(blitext extract-features makes it), or --online to encode images in the loop")


RESUME_KEYS = ("stage", "w_align", "align_loss", "align_contrast_weight", "align_contrast_temp", "align_negatives",
               "align_steps", "align_lr", "align_max_grad_norm", "text_encoder", "llm", "n_prompt", "cross_attention_frequency",
               "num_layers", "dropout", "embed_dim",
               "max_text_len", "end_of_text", "batch_size", "lr", "llm_proj_lr_scale", "min_lr", "max_grad_norm",
               "warmup_steps", "seed", "epochs", "max_steps")


def default_run_dir(config: AdapterConfig) -> Path:
    return default_cache_root() / "runs" / "adapter" / f"stage{config.stage}-w{config.w_align:g}"


def total_steps(config: AdapterConfig, n_pairs: int) -> int:
    """The alignment phase's steps (if any) plus the stage's own."""
    own = config.max_steps if config.max_steps is not None else max(1, config.epochs * (n_pairs // config.batch_size))
    return config.align_steps + own  # max_steps 0 with --align-steps: a run of the alignment phase alone


# ---------------------------------------------------------------- entry point

def train_adapter(config: AdapterConfig) -> Path:
    """Train (or resume) one adaptor stage; returns `<run>/final`."""
    check_out(config.out)
    return run_distributed(config.device, lambda device, info: _train(config, device, info))


@dataclass
class Setup:
    """Everything the loop needs, with what identifies the run (checked on resume and in stage 2)."""
    model: QFormer
    tokenizer: object
    source: object
    pairs: Pairs
    prompts: PromptCache | None
    llm: object | None
    identity: dict
    align: object       # L_align(prompts, reference), the --align-loss form


def _train(config: AdapterConfig, device: str, info) -> Path:
    require_batch_splits(config.batch_size, info.world * config.accum_steps)
    setup = _setup(config, device)
    run = Path(config.out) if config.out else default_run_dir(config)
    model = setup.model.to(device)
    trainable = model.train_only(config.stage, config.w_align > 0)
    optimizer = adamw(llm_proj_groups(model, config.llm_proj_lr_scale), config.lr, config.weight_decay)
    start, resumed = resume_run(run, config, model, optimizer, setup.identity)
    if start == 0 and config.init:
        load_init(config.init, model, setup.identity, config.stage)
    steps = total_steps(config, len(setup.pairs))
    if len(setup.pairs) < config.batch_size:
        raise BlitextError(f"{len(setup.pairs)} image-caption pairs < batch_size {config.batch_size}; lower --batch-size")
    say(f"train-adapter stage {config.stage}: {len(setup.pairs):,} pairs"
        + (f" ({setup.pairs.skipped} captions without features skipped)" if setup.pairs.skipped else "")
        + f", {steps:,} steps of {config.batch_size}, w_align {config.w_align:g}, {model.n_prompt} queries, "
        f"{len(trainable)} trainable tensors, {'online encoder' if config.online else 'cached features'} on {device}")
    metrics, log = open_run(run, info, start, "train-adapter", config)
    state = {**setup.identity, "config": to_jsonable(config), "provenance": provenance(config),
             **model.describe(), "pairs": len(setup.pairs)}
    if setup.llm is not None:  # what generate and eval default to for this adaptor's captions
        state["generation"] = caption_record(setup.llm, setup.pairs.texts)
    loop = AdapterLoop(config, model, setup, device, info, metrics, log, resumed)
    with tracking(metrics):
        loop.run(start, steps, run, optimizer, state)
    return finish_run(run, steps, model, loop.checkpoint_state(state), info, weights=adapter_weights(model),
                      extra=loop.checkpoint_extra)


def _setup(config: AdapterConfig, device: str) -> Setup:
    features = FeatureCache(config.features) if config.features else None
    encoder_name = config.vision_encoder or (features.producer["encoder"] if features else DEFAULT_VISION_ENCODER)
    if config.online:
        encoder = load_vision_encoder(encoder_name, device=device)
        source = OnlineFeatures(encoder, None, config.decode_threads)
    else:
        if config.vision_encoder:  # the user named an encoder: the cache must be its
            expected = load_vision_encoder(config.vision_encoder).producer()
            features = FeatureCache(config.features, expect=expected,
                                    fix="re-run extract-features with this encoder, or pass its --features")
        source = CachedFeatures(features)
    captions = config.captions or default_captions(features)
    pairs = read_pairs(captions, config.image_root, lambda image_id: image_id in source, source.accepts)
    if config.online:
        source.refs = pairs.image_refs
    prompts = prompt_cache(config, pairs)
    llm = load_llm(config.llm, device=device) if config.stage == 2 else None
    if llm is not None and config.grad_checkpointing:
        llm.checkpoint_layers()
    llm_fp = llm.fingerprint if llm else fingerprint(display_name(config.llm), llm_path(config.llm))
    if prompts is not None:
        prompts.require_llm(llm_fp, llm.family if llm else llm_family(config.llm), config.llm)
    d_llm = llm.width if llm else llm_width(config.llm)
    n_prompt = config.n_prompt or (prompts.producer["n_prompt"] if prompts else PFormerConfig.n_prompt)
    if prompts is not None and n_prompt != prompts.producer["n_prompt"]:
        raise BlitextError(f"--n-prompt {n_prompt} but the reference prompts have {prompts.producer['n_prompt']} "
                           f"slots: L_align compares them slot by slot; use --n-prompt {prompts.producer['n_prompt']}")
    text_encoder = load_text_encoder(config.text_encoder)
    if config.num_layers:
        keep_first_layers(text_encoder.model, config.num_layers, config.text_encoder)
    if config.dropout is not None:  # from_text_encoder copies the encoder's rates into the Q-Former's config
        text_encoder.model.config.hidden_dropout_prob = text_encoder.model.config.attention_probs_dropout_prob = \
            config.dropout
    tokenizer = qformer_tokenizer(text_encoder.tokenizer)
    torch.manual_seed(config.seed)  # the new parts' initialisation (queries, cross-attention, heads)
    model = QFormer.from_text_encoder(text_encoder.model, tokenizer, source.width, n_prompt, d_llm,
                                      config.cross_attention_frequency, config.embed_dim)
    align, scales = alignment(config.align_loss, prompts, pairs, contrast_weight=config.align_contrast_weight,
                              contrast_temp=config.align_contrast_temp, negatives=config.align_negatives)
    identity = {"features_producer": source.producer, "llm_fingerprint": llm_fp,
                "text_encoder_fingerprint": text_encoder.fingerprint,
                "prompts_producer": prompts.producer if prompts else None,
                "resume_config": {k: getattr(config, k) for k in RESUME_KEYS}, "align_scales": scales}
    return Setup(model, tokenizer, source, pairs, prompts, llm, identity, align)


# ---------------------------------------------------------------- the loop

class AdapterLoop(TrainerLoop):
    def __init__(self, config: AdapterConfig, model: QFormer, setup: Setup, device: str, info, metrics, log,
                 resumed: dict | None = None):
        super().__init__(config, model, device, info, metrics, log)
        self.captions = CaptionCounts(config.max_text_len, setup.pairs.no_caption, resumed)
        self.title, self.s, self.tokenizer = f"train-adapter stage {config.stage}", setup, setup.tokenizer
        step_losses = StepLosses(model, self.losses)
        self.forward = DistributedDataParallel(step_losses, find_unused_parameters=config.align_steps > 0) \
            if info.world > 1 else step_losses
        # Which pairs count as matches inside a batch: same image or identical caption text. Stored
        # pairs map them (read per batch, not held per rank); in-memory pairs number them here, once
        self.groups = setup.pairs.groups()

    def batch_indices(self, step: int) -> list[int]:
        return global_batch(step, len(self.s.pairs), self.c.batch_size, self.c.seed)

    def load(self, step: int) -> dict:
        """The I/O of one step (run ahead in the prefetch thread): this rank's features and prompts."""
        rows = rank_slice(self.batch_indices(step), self.info.rank, self.info.world)
        pairs = self.s.pairs
        batch = {"features": self.s.source.read([pairs.image_ids[i] for i in rows])}
        if self.s.prompts is not None:
            batch["reference"] = self.s.prompts.rows([pairs.keys[i] for i in rows])
        return batch

    def record_fields(self, step: int) -> dict:
        return {"temp": float(self.model.temp.detach())}

    def checkpoint_weights(self):
        return adapter_weights(self.model)

    def checkpoint_extra(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder / "tokenizer")

    def phase(self, step: int, steps: int) -> tuple[str, int, int]:
        """(name, first step, length) of the phase `step` is in: "align" (L_align alone) or the stage's own."""
        align = self.c.align_steps
        return ("align", 0, align) if step < align else (f"stage{self.c.stage}", align, steps - align)

    def rate_and_clip(self, name: str) -> tuple[float, float | None]:
        """The phase's peak rate and gradient clip: the L_align-alone phase may set its own."""
        c, own = self.c, name == "align"
        return (c.align_lr or c.lr, c.align_max_grad_norm or c.max_grad_norm) if own else (c.lr, c.max_grad_norm)

    def train_step(self, step: int, steps: int, batch: dict) -> dict[str, float]:
        c = self.c
        name, start, length = self.phase(step, steps)
        if step == start and step > 0:
            self.optimizer.state.clear()  # a new phase is a new training: x w_align moments would mis-scale it
        peak, clip = self.rate_and_clip(name)
        set_lr(self.optimizer, lr_at(step - start, length, peak, c.min_lr, c.warmup_steps, c.warmup_start_lr))
        index = self.batch_indices(step)
        self.count_cut(name, step, index)
        features, feature_mask = self.s.source.encode(batch["features"], self.device)
        reference = None if self.s.prompts is None else self.s.prompts.expand(batch["reference"])
        torch.manual_seed(step_seed(c.seed, step, self.info.rank))  # dropout of this step

        def micro(features, feature_mask, reference):
            losses = self.forward(name, step, index, features, feature_mask, reference)
            return losses, sum(v * (c.w_align if k == "align" else 1.0) for k, v in losses.items())

        def lm_tokens():
            return self.targets(step, index, self.info.rank, self.info.world).loss_mask.sum() if name == "stage2" else None
        logged = self.accumulated(micro, (features, feature_mask, reference), lm_tokens, self.forward, clip)
        with torch.no_grad():  # BLIP clamps the parameter itself, not only inside the loss
            self.model.temp.clamp_(TEMP_MIN, TEMP_MAX)
        return logged

    def _align(self, query_output: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor | None:
        """L_align on llm_proj(queries). At weight 0 it is only measured (no graph): the run then
        trains exactly as one without prompts, llm_proj untouched in stage 1."""
        if reference is None:
            return None
        if self.c.w_align == 0:
            with torch.no_grad():
                return self.s.align(self.model.llm_proj(query_output.detach()), reference)
        return self.s.align(self.model.llm_proj(query_output), reference)

    def losses(self, phase: str, step: int, index: list[int], features, feature_mask, reference) -> dict:
        if phase == "align":  # only llm_proj(queries) and the references: no text branch, no LLM
            return {"align": self._align(self.model.query_output(features, feature_mask), reference)}
        losses = self.stage1_losses if self.c.stage == 1 else self.stage2_losses
        return losses(step, index, features, feature_mask, reference)

    def stage1_losses(self, step: int, index: list[int], features, feature_mask, reference) -> dict:
        c, model, world, rank = self.c, self.model, self.world, self.rank
        texts = [self.s.pairs.texts[i] for i in index]
        tok = self.tokenizer(texts, padding="longest", truncation=True, max_length=c.max_text_len, return_tensors="pt")
        rows = rank_slice(list(range(len(index))), rank, world)
        ids, att = tok.input_ids[rows].to(self.device), tok.attention_mask[rows].to(self.device)  # (B, L)
        positive = self.positives(index, rows).to(self.device)  # (B, N)

        query = model.query_output(features, feature_mask)  # (B, Q, H)
        image_feat = F.normalize(self.model.vision_proj(query), dim=-1)  # (B, Q, E)
        text_feat = F.normalize(self.model.text_proj(model.text_output(ids, att)[:, 0]), dim=-1)  # (B, E)
        itc, sim_i2t, sim_t2i = itc_loss(image_feat, text_feat, self.model.temp, positive, c.label_smoothing)

        uniform = torch.rand(2, len(index), generator=step_generator(c.seed, step))[:, rows]  # same draws on any world size
        neg_text, has_text = itm_negatives(sim_i2t, positive, uniform[0])   # per local image: a global text
        neg_image, has_image = itm_negatives(sim_t2i, positive, uniform[1])  # per local text: a global image
        all_features = _gather(features)  # (N, T, D): negatives' visual tokens from every rank
        all_ids, all_att = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        itm_ids = torch.cat([ids, ids[has_image], all_ids[neg_text[has_text]]])
        itm_att = torch.cat([att, att[has_image], all_att[neg_text[has_text]]])
        itm_feats = torch.cat([features, all_features[neg_image[has_image]], features[has_text]])
        q = self.model.n_prompt
        joint = model.joint_output(itm_ids, itm_feats, torch.cat([itm_att.new_ones(len(itm_ids), q), itm_att], 1))
        itm_logits = self.model.itm_head(joint[:, :q]).mean(1)  # (3B', 2)
        labels = torch.cat([torch.ones(len(ids)), torch.zeros(len(itm_ids) - len(ids))]).long().to(self.device)
        itm = itm_loss(itm_logits, labels)

        dec_ids = ids.clone()
        dec_ids[:, 0] = self.tokenizer.bos_token_id  # [DEC] replaces [CLS]: the caption starts from the queries
        hidden = model.joint_output(dec_ids, features, unilm_mask(q, att), feature_mask)[:, q:]
        itg = itg_loss(self.model.lm_logits(hidden), dec_ids, att, c.label_smoothing) * self.token_share(att[:, 1:])

        losses = {"itc": itc, "itm": itm, "itg": itg}
        align = self._align(query, reference)
        return losses if align is None else {**losses, "align": align}

    def count_cut(self, phase: str, step: int, index: list[int]) -> None:
        """The step's captions cut to max_text_len, by the tokenizer that reads them (the alignment phase
        reads none). Over the global batch, so every rank counts the same and one step counts once."""
        if phase == "stage1":
            self.captions.count_tokens("qformer", self.tokenizer, [self.s.pairs.texts[i] for i in index])
        elif phase == "stage2":
            self.captions.count_cut("target", self.lm_batch(step, index, list(range(len(index)))).truncated)

    def lm_batch(self, step: int, index: list[int], rows: list[int]):
        """Stage 2's LM targets of `rows` of the global batch, on the CPU (T5: split at drawn words)."""
        c = self.c
        draws = torch.rand(len(index), generator=step_generator(c.seed, step))[rows]  # T5's split words, any world
        return self.s.llm.training_batch([self.s.pairs.texts[index[r]] for r in rows], draws, c.end_of_text,
                                         c.max_text_len)

    def targets(self, step: int, index: list[int], rank: int, world: int):
        """Stage 2's LM targets of slice `rank` of `world` of the global batch, on the device."""
        return self.lm_batch(step, index, rank_slice(list(range(len(index))), rank, world)).to(self.device)

    def stage2_losses(self, step: int, index: list[int], features, feature_mask, reference) -> dict:
        tgt = self.targets(step, index, self.rank, self.world)
        query = self.model.query_output(features, feature_mask)
        prompts = self.model.llm_proj(query)  # (B, Q, d_llm)
        lm = self.s.llm.lm_loss(prompts, tgt) * self.token_share(tgt.loss_mask)
        align = self._align(query, reference)
        return {"lm": lm} if align is None else {"lm": lm, "align": align}

    def positives(self, index: list[int], rows: list[int]) -> torch.Tensor:
        """(B_local, N): pair j of the global batch matches local pair i (same image or same caption)."""
        # the batch's numbers gathered from the (mapped) arrays: a small writable copy torch can wrap
        img, txt = (torch.from_numpy(np.asarray(numbers[index])) for numbers in self.groups)
        return (img[rows, None] == img[None]) | (txt[rows, None] == txt[None])


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x, concatenated in rank order (no gradient: negatives' inputs are constants)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)
