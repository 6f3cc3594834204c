"""The embedded default's small-scale recipe, written once: `blitext demo`, `blitext ablate` and
bench/reproduce.py train the P-Former and the Q-Former with it. The paper's defaults stay those of
`train-pformer` and `train-adapter`; docs/results.md says what measured each choice here.

Table 4 as the paper runs it: every cell trains BLIP-2's stage 1 (ITC + ITM + ITG, + w1 x L_align
in the P-Former cells; the LLM never runs), then stage 2 (the frozen LLM's loss + w2 x L_align)
from it. Stage 1's L_align is the contrastive form with a bank of references as extra negatives
(docs/method.md#contrastive-alignment): with the paper's MSE the adaptor fits what the references
share more than what tells them apart (0.35 exact captions from alignment alone, against 0.98).
Stage 2's L_align is the paper's MSE.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from blitext.adapter.image import AdapterConfig
from blitext.pformer.train import PFormerConfig


@dataclass
class Recipe:
    """The P-Former's and the Q-Former's small-scale settings (a 2-core CPU, 500 easy-VQA images)."""
    pformer_steps: int = 150            # P-Former steps (about 1.6 s each on 2 cores; 150 and 200 both read back 1.00)
    pformer_batch_size: int = 16
    pformer_lr: float = 3e-4            # with clipping its references read back exactly for 1.00 of the demo's test
                                        # captions; at the paper's 1e-4, 0.41 (4e-4 unclipped once decoded "_red")
    pformer_max_grad_norm: float = 1.0  # clip its gradient norm (the paper: none; batch 16 here)
    n_prompt: int = 8                   # soft prompts = queries (paper: 32; 8 keeps the CPU run short)
    num_layers: int = 4                 # MiniLM's first 4 of 6 layers
    cross_attention_frequency: int = 1  # the image in every layer (paper: every 2nd)
    dropout: float = 0.0                # at MiniLM's 0.1 the adaptor learned prompts that worked only with noise on them
    batch_size: int = 16
    align_steps: int = 300              # P-Former cells: L_align alone before stage 1's own steps (no text branch, no
                                        # LLM: about a fifth of a stage-1 step); alone: 0.92 exact at 250, 0.98 at 500
    stage1_steps: int = 60              # BLIP-2's stage 1 (ITC + ITM + ITG, + w1 L_align): no LLM; ~1.25 s a step
    stage1_lr: float = 2e-4             # at 1e-3 the Q-Former collapsed: one query output for every slot and image
    align_lr: float | None = 4e-4       # the L_align-alone steps' rate (None: stage1_lr); at 2e-4 unclipped alignment
                                        # alone wrote 0.76 exact captions after stage 1 (seed 42); here 0.97 / 0.86 / 0.95
                                        # (seeds 42 / 1 / 2, bench/results/budget-stage1-alignclip.json)
    align_max_grad_norm: float | None = 1.0  # clip only the L_align-alone steps: a clipped BLIP-2 stage 1 stalled
                                        # its stage 2 (LM 2.4 after 180 steps, 0.00 exact): docs/results.md
    stage1_max_grad_norm: float | None = None  # clip stage 1's gradient norm (both phases, every cell)
    stage1_llm_proj_lr_scale: float = 10.0  # llm_proj at 10x: it must move the prompts to the references' place
    stage1_warmup_steps: int = 20
    align_loss: str = "contrastive"     # stage 1's L_align form (stage 2: the paper's mse); its weight: AdapterConfig's
    align_negatives: int = 256          # the contrastive InfoNCE's fixed bank of references beside the batch's (all of
                                        # easy-VQA's 24 captions): 0.98 exact from alignment alone, 0.90 without
    stage2_steps: int = 200             # the frozen LLM runs: about 1 s a step of 16 on 2 cores
    stage2_lr: float = 1e-4             # the paper's rate
    stage2_warmup_steps: int = 20
    stage2_llm_proj_lr_scale: float = 10.0  # from BLIP-2's stage 1 at one rate the LM loss jumped 8.7 -> 9.8 in 50
                                        # steps; llm_proj at 10x: 8.7 -> 3.3 in 60 (docs/results.md)
    stage2_max_grad_norm: float = 1.0   # clipping keeps the first steps at batch 16 from jumping
    snapshot_steps: list[int] = field(default_factory=lambda: [10, 25, 50, 75, 100, 150])  # the budget curve's points

    def scaled(self, s: float) -> "Recipe":
        return replace(self, pformer_steps=round(self.pformer_steps * s), align_steps=round(self.align_steps * s), stage1_steps=round(self.stage1_steps * s),
                       stage2_steps=round(self.stage2_steps * s),
                       stage1_warmup_steps=max(1, round(self.stage1_warmup_steps * s)),
                       stage2_warmup_steps=max(1, round(self.stage2_warmup_steps * s)),
                       snapshot_steps=sorted({max(1, round(x * s)) for x in self.snapshot_steps}))


def adapter_base(r: Recipe, features: Path, prompts: Path | None, captions: list[str], seed: int) -> AdapterConfig:
    """What both stages share."""
    return AdapterConfig(features=str(features), prompts=prompts and str(prompts), captions=captions,
                         n_prompt=r.n_prompt, num_layers=r.num_layers,
                         cross_attention_frequency=r.cross_attention_frequency, dropout=r.dropout, seed=seed,
                         batch_size=r.batch_size, log_every=1, w_align=0.0)


def stage1_config(r: Recipe, base: AdapterConfig, w1: float, out: Path, resume: str | None) -> AdapterConfig:
    """BLIP-2's stage 1 (ITC + ITM + ITG) + w1 x L_align (L_align only measured at w1 = 0), after
    `align_steps` of L_align alone in the P-Former cells (fresh AdamW moments between the two)."""
    return replace(base, stage=1, w_align=w1, align_loss=r.align_loss if w1 > 0 else "mse",
                   align_negatives=r.align_negatives if w1 > 0 and r.align_loss == "contrastive" else 0,
                   align_steps=r.align_steps if w1 > 0 else 0,
                   max_steps=r.stage1_steps, lr=r.stage1_lr, align_lr=r.align_lr if w1 > 0 else None,
                   align_max_grad_norm=r.align_max_grad_norm if w1 > 0 else None,
                   max_grad_norm=r.stage1_max_grad_norm,
                   llm_proj_lr_scale=r.stage1_llm_proj_lr_scale, warmup_steps=r.stage1_warmup_steps,
                   save_every=max(10, (r.align_steps + r.stage1_steps) // 2), out=str(out), resume=resume)


def stage2_config(r: Recipe, base: AdapterConfig, w2: float, init: Path, out: Path, resume: str | None) -> AdapterConfig:
    """The frozen LLM's loss + w2 x the paper's L_align (MSE), from stage 1, with the budget curve's snapshots."""
    return replace(base, stage=2, w_align=w2, align_loss="mse", init=str(init), max_steps=r.stage2_steps,
                   lr=r.stage2_lr, llm_proj_lr_scale=r.stage2_llm_proj_lr_scale, warmup_steps=r.stage2_warmup_steps,
                   max_grad_norm=r.stage2_max_grad_norm,
                   save_every=max(10, r.stage2_steps // 2), snapshot_steps=[s for s in r.snapshot_steps
                                                                          if s < r.stage2_steps],
                   out=str(out), resume=resume)


def pformer_config(r: Recipe, text: list[str], out: Path, heldout: int, seed: int, resume: str | None,
                   sample_every: int | None = None) -> PFormerConfig:
    """The P-Former's training on `text`, at the recipe's steps, batch, rate and clipping."""
    return PFormerConfig(text=text, out=str(out), n_prompt=r.n_prompt, batch_size=r.pformer_batch_size,
                         max_steps=r.pformer_steps, lr=r.pformer_lr, max_grad_norm=r.pformer_max_grad_norm,
                         warmup_steps=max(1, r.pformer_steps // 7), save_every=100, heldout=heldout, seed=seed,
                         sample_every=sample_every or max(1, r.pformer_steps // 2), resume=resume)


def pformer_tag(r: Recipe) -> str:
    """Names a P-Former run by what trains it differently: '8x200-lr0.0003-clip1'."""
    clip = f"-clip{r.pformer_max_grad_norm:g}" if r.pformer_max_grad_norm else ""
    return f"{r.n_prompt}x{r.pformer_steps}-lr{r.pformer_lr:g}{clip}"


def train_once(run: Path, train) -> None:
    """Train unless `<run>/final` exists; resume an interrupted run."""
    from blitext.console import say

    if (run / "final").is_dir():
        say(f"  reusing {run / 'final'}")
        return
    train("latest" if (run / "checkpoints").exists() else None)


def train_cell(r: Recipe, name: str, w1: float, w2: float, features: Path, prompts: Path, captions: list[str],
               work: Path, seed: int, stage2: bool = True, stage1_of: str | None = None) -> tuple[Path, Path]:
    """One Table 4 cell: stage 1 (ITC + ITM + ITG + w1 L_align), then stage 2 (LM + w2 L_align) from it.
    Returns the two run folders (each reused once finished; stage 2 only trained when asked). Cells
    with the same w1 share one stage 1: `stage1_of` names the cell whose stage-1 folder this one uses."""
    from blitext.adapter.image import train_adapter
    from blitext.console import say

    base = adapter_base(r, features, prompts, captions, seed)
    s1, s2 = work / f"{stage1_of or name}-stage1", work / f"{name}-stage2"
    say(f"[bold]{name}: stage 1[/] (" + (f"{r.align_steps} steps of L_align ({r.align_loss}) alone, then " if w1 else "")
        + f"{r.stage1_steps} of BLIP-2's ITC + ITM + ITG" + (f" + {w1:g} x L_align" if w1 else "")
        + "; the LLM never runs)")
    train_once(s1, lambda resume: train_adapter(stage1_config(r, base, w1, s1, resume)))
    if stage2:
        say(f"[bold]{name}: stage 2[/] (frozen-LLM loss + {w2:g} x L_align, {r.stage2_steps} steps)")
        train_once(s2, lambda resume: train_adapter(stage2_config(r, base, w2, s1, s2, resume)))
    return s1, s2
