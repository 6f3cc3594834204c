"""Stages 1 and 2 for videos: `blitext train-adapter --modality video` - the Transformer adaptor (docs/method.md#video-path).

The paper's schedule (section 4.5) is the default, as two phases of one run: L_align alone
(x w_align = 100) for 10 epochs - the LLM is never run, only `llm_proj` and the reference
prompts are needed - then the frozen LLM's loss alone on caption + end-of-text for 10 more.
Each phase has its own warm-up and cosine decay and starts with fresh AdamW moments (two
trainings in the paper; moments of the x100 alignment gradients would mis-scale the first LM
steps). `--schedule joint`: one phase of LM + w_align * L_align. `--w-align 0`: the LM phase
alone, the paper's "ITG only" baseline (L_align is still measured when --prompts is given).

    torchrun --standalone --nproc_per_node 2 --no-python blitext train-adapter --modality video \\
        --features cache/features/vatex__i3d --prompts cache/prompts/vatex__pformer

Like the image trainer: cached features by video id and reference prompts by caption key,
caches from another producer, LLM or P-Former refused, `batch_size` global and split across
ranks, randomness a function of (seed, step, rank), so `--resume latest` is exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from blitext.atomic import check_out
from blitext.adapter.common import StepLosses, caption_record, prompt_cache
from blitext.cache import FeatureCache
from blitext.caption_counts import CaptionCounts
from blitext.config import TrainerFields, default_cache_root, provenance, to_jsonable
from blitext.console import say
from blitext.data.pairs import CachedFeatures, default_captions, read_pairs
from blitext.distributed import run_distributed
from blitext.errors import BlitextError
from blitext.losses import alignment_loss
from blitext.loop import RunOptions, TrainerLoop, finish_run, resume_run
from blitext.pformer.train import PFormerConfig
from blitext.models.adapter_checkpoint import adapter_weights
from blitext.models.loading import load_llm, load_text_encoder
from blitext.models.video_adapter import VideoAdapter
from blitext.training import (adamw, global_batch, llm_proj_groups, lr_at, open_run, rank_slice, require_batch_splits,
                              set_lr, step_generator, step_seed, tracking)

SCHEDULES = ("sequential", "joint")


@dataclass
class VideoAdapterConfig(RunOptions, TrainerFields):
    features: str = ""                  # video feature cache (extract-features --modality video, import-features)
    prompts: str | None = None          # reference prompts from build-prompts; needed when w_align > 0
    captions: list[str] = field(default_factory=list)  # caption JSON; default: the features' prepared data, train split
    schedule: str = "sequential"        # sequential: L_align alone, then LM alone (paper); joint: LM + w_align L_align
    w_align: float = 100.0              # alignment weight (paper: x100); 0 = LM only ("ITG only" baseline)
    n_prompt: int | None = None         # soft prompts (slots); default: the prompt cache's, else the P-Former's default (paper: 32)
    epochs: int = 10                    # LM phase (the joint schedule's only phase); paper: 10
    align_epochs: int = 10              # sequential: the alignment phase before it; paper: 10
    align_steps: int | None = None      # overrides align_epochs
    batch_size: int = 128               # global; the paper gives none for video (VATEX: 26K clips, 200 steps an epoch)
    llm_proj_lr_scale: float = 1.0      # llm_proj's rate / lr (paper: one rate); small batches need more (demo: 20)
    warmup_steps: int = 200             # per phase; the paper gives none for video: a tenth of a VATEX phase
    prefetch: int = 2                   # batches read ahead in a background thread

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.captions, str):
            self.captions = [self.captions]
        if self.schedule not in SCHEDULES:
            raise BlitextError(f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.w_align < 0:
            raise BlitextError(f"--w-align must be >= 0, got {self.w_align}")
        if self.w_align > 0 and not self.prompts:
            raise BlitextError(f"--w-align {self.w_align:g} needs reference prompts: pass --prompts CACHE "
                               f"(blitext build-prompts makes it), or --w-align 0 for the LM-only baseline")
        if not self.features:
            raise BlitextError("train-adapter --modality video reads cached video features: pass --features CACHE "
                               "(blitext extract-features --modality video or import-features makes it)")


RESUME_KEYS = ("schedule", "w_align", "text_encoder", "llm", "n_prompt", "max_text_len", "end_of_text", "epochs",
               "max_steps", "align_epochs", "align_steps", "batch_size", "lr", "llm_proj_lr_scale", "max_grad_norm",
               "min_lr", "warmup_steps", "seed")


@dataclass(frozen=True)
class Phase:
    name: str        # "align" (L_align alone), "lm" (LM alone) or "joint" (LM + w L_align)
    start: int       # its first global step
    steps: int

    def weights(self, w_align: float) -> dict[str, float]:
        """The weight of each loss term; a term at weight 0 is measured without a graph."""
        return {"align": {"align": w_align}, "lm": {"lm": 1.0, "align": 0.0},
                "joint": {"lm": 1.0, "align": w_align}}[self.name]


def plan_phases(config: VideoAdapterConfig, n_pairs: int) -> list[Phase]:
    per_epoch = max(1, n_pairs // config.batch_size)
    lm = config.max_steps or config.epochs * per_epoch
    align = (config.align_steps or config.align_epochs * per_epoch) if config.schedule == "sequential" else 0
    if config.w_align == 0:
        align = 0  # nothing to train on: the baseline is the LM phase alone
    if config.schedule == "joint":
        return [Phase("joint", 0, lm)]
    return [p for p in (Phase("align", 0, align), Phase("lm", align, lm)) if p.steps > 0]


def default_run_dir(config: VideoAdapterConfig) -> Path:
    return default_cache_root() / "runs" / "video-adapter" / f"{config.schedule}-w{config.w_align:g}"


# ---------------------------------------------------------------- entry point

def train_video_adapter(config: VideoAdapterConfig) -> Path:
    """Train (or resume) the video adaptor through every phase; returns `<run>/final`."""
    check_out(config.out)
    return run_distributed(config.device, lambda device, info: _train(config, device, info))


@dataclass
class Setup:
    model: VideoAdapter
    source: CachedFeatures
    pairs: object
    prompts: object | None
    llm: object
    identity: dict


def _train(config: VideoAdapterConfig, device: str, info) -> Path:
    require_batch_splits(config.batch_size, info.world * config.accum_steps)
    s = _setup(config, device)
    run = Path(config.out) if config.out else default_run_dir(config)
    model = s.model.to(device)
    optimizer = adamw(llm_proj_groups(model, config.llm_proj_lr_scale), config.lr, config.weight_decay)
    start, resumed = resume_run(run, config, model, optimizer, s.identity)
    if len(s.pairs) < config.batch_size:
        raise BlitextError(f"{len(s.pairs)} video-caption pairs < batch_size {config.batch_size}; lower --batch-size")
    phases = plan_phases(config, len(s.pairs))
    steps = phases[-1].start + phases[-1].steps
    say(f"train-adapter --modality video: {len(s.pairs):,} pairs"
        + (f" ({s.pairs.skipped} captions without features skipped)" if s.pairs.skipped else "")
        + f", phases {', '.join(f'{p.name} {p.steps:,}' for p in phases)} steps of {config.batch_size}, "
        f"w_align {config.w_align:g}, {model.n_prompt} slots, on {device}")
    metrics, log = open_run(run, info, start, "train-adapter", config)
    state = {**s.identity, "modality": "video", "config": to_jsonable(config), "provenance": provenance(config),
             **model.describe(), "pairs": len(s.pairs), "phases": [p.__dict__ for p in phases]}
    if s.llm is not None:  # what generate and eval default to for this adaptor's captions
        state["generation"] = caption_record(s.llm, s.pairs.texts)
    loop = VideoLoop(config, s, phases, device, info, metrics, log, resumed)
    with tracking(metrics):
        loop.run(start, steps, run, optimizer, state)
    return finish_run(run, steps, model, loop.checkpoint_state(state), info, weights=adapter_weights(model))


def _setup(config: VideoAdapterConfig, device: str) -> Setup:
    features = FeatureCache(config.features)
    if features.producer.get("modality") != "video":
        raise BlitextError(f"{config.features} holds {features.producer.get('modality', 'image')} features "
                           f"(made by {features.producer.get('encoder')}), not video: pass a cache from "
                           f"extract-features --modality video (or import-features)")
    source = CachedFeatures(features)
    pairs = read_pairs(config.captions or default_captions(features), None, lambda video_id: video_id in source,
                       source.accepts)
    prompts = prompt_cache(config, pairs)
    llm = load_llm(config.llm, device=device)
    if config.grad_checkpointing:
        llm.checkpoint_layers()
    if prompts is not None:
        prompts.require_llm(llm.fingerprint, llm.family, config.llm)
    n_prompt = config.n_prompt or (prompts.producer["n_prompt"] if prompts else PFormerConfig.n_prompt)
    if prompts is not None and n_prompt != prompts.producer["n_prompt"]:
        raise BlitextError(f"--n-prompt {n_prompt} but the reference prompts have {prompts.producer['n_prompt']} "
                           f"slots: L_align compares them slot by slot; use --n-prompt {prompts.producer['n_prompt']}")
    text_encoder = load_text_encoder(config.text_encoder)
    torch.manual_seed(config.seed)  # the new layers' initialisation (input_proj, llm_proj)
    model = VideoAdapter.from_text_encoder(text_encoder.model, source.width, n_prompt, llm.width)
    identity = {"features_producer": source.producer, "llm_fingerprint": llm.fingerprint,
                "text_encoder_fingerprint": text_encoder.fingerprint,
                "prompts_producer": prompts.producer if prompts else None,
                "resume_config": {k: getattr(config, k) for k in RESUME_KEYS}}
    return Setup(model, source, pairs, prompts, llm, identity)


# ---------------------------------------------------------------- the loop

class VideoLoop(TrainerLoop):
    title = "train-adapter video"

    def __init__(self, config: VideoAdapterConfig, setup: Setup, phases: list[Phase], device: str, info, metrics, log,
                 resumed: dict | None = None):
        super().__init__(config, setup.model, device, info, metrics, log)
        self.captions = CaptionCounts(config.max_text_len, setup.pairs.no_caption, resumed)
        self.s, self.phases = setup, phases
        step_losses = StepLosses(setup.model, self.losses)
        self.forward = DistributedDataParallel(step_losses) if info.world > 1 else step_losses

    def phase_at(self, step: int) -> Phase:
        return next(p for p in reversed(self.phases) if step >= p.start)

    def load(self, step: int) -> dict:
        """One step's I/O (run ahead in the prefetch thread): this rank's features and reference prompts."""
        index = global_batch(step, len(self.s.pairs), self.c.batch_size, self.c.seed)
        rows = rank_slice(index, self.info.rank, self.info.world)
        batch = {"index": index, "features": self.s.source.read([self.s.pairs.image_ids[i] for i in rows]),
                 "draws": torch.rand(len(index), generator=step_generator(self.c.seed, step))}  # T5's split words
        if self.s.prompts is not None:
            batch["reference"] = self.s.prompts.rows([self.s.pairs.keys[i] for i in rows])
        return batch

    def record_fields(self, step: int) -> dict:
        return {"phase": self.phase_at(step).name}

    def checkpoint_weights(self):
        return adapter_weights(self.model)

    def train_step(self, step: int, steps: int, batch: dict) -> dict[str, float]:
        c, phase = self.c, self.phase_at(step)
        if step == phase.start and step > 0:
            self.optimizer.state.clear()  # a new phase is a new training (module docstring)
        set_lr(self.optimizer, lr_at(step - phase.start, phase.steps, c.lr, c.min_lr, c.warmup_steps,
                                     c.warmup_start_lr))
        features, mask = self.s.source.encode(batch["features"], self.device)
        torch.manual_seed(step_seed(c.seed, step, self.info.rank))  # dropout of this step
        weights = phase.weights(c.w_align)
        reference = None if self.s.prompts is None else self.s.prompts.expand(batch["reference"])
        index, draws = batch["index"], batch["draws"]
        if phase.name != "align":  # the LM's captions cut to max_text_len, over the global batch: every rank the same
            self.captions.count_cut("target", self.lm_batch(index, draws, list(range(len(index)))).truncated)

        def micro(features, mask, reference):
            losses = self.forward(phase.name, index, draws, features, mask, reference)
            return losses, sum(v * weights[k] for k, v in losses.items())

        def lm_tokens():
            return None if phase.name == "align" else \
                self.targets(index, draws, self.info.rank, self.info.world).loss_mask.sum()
        return self.accumulated(micro, (features, mask, reference), lm_tokens, self.forward, c.max_grad_norm)

    def lm_batch(self, index: list[int], draws: torch.Tensor, rows: list[int]):
        """LM targets (caption + end-of-text; T5: split at drawn words) of `rows` of the global batch, on the CPU."""
        return self.s.llm.training_batch([self.s.pairs.texts[index[r]] for r in rows], draws[rows],
                                         self.c.end_of_text, self.c.max_text_len)

    def targets(self, index: list[int], draws: torch.Tensor, rank: int, world: int):
        """LM targets of slice `rank` of `world` of the global batch, on the device."""
        return self.lm_batch(index, draws, rank_slice(list(range(len(index))), rank, world)).to(self.device)

    def losses(self, phase: str, index: list[int], draws: torch.Tensor, features, mask, reference) -> dict:
        """This rank's loss terms: LM on caption + end-of-text (T5: prefix LM, as the image stage 2;
        not in the alignment phase), L_align to the reference prompts (with no graph when its weight is 0)."""
        prompts = self.model.prompts(features, mask)  # (B, S, d_llm)
        out = {}
        if phase != "align":
            tgt = self.targets(index, draws, self.rank, self.world)
            out["lm"] = self.s.llm.lm_loss(prompts, tgt) * self.token_share(tgt.loss_mask)
        if reference is not None:
            trained = phase != "lm" and self.c.w_align > 0
            with torch.set_grad_enabled(trained and torch.is_grad_enabled()):
                out["align"] = alignment_loss(prompts if trained else prompts.detach(), reference)
        return out
