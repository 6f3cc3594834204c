"""What the image and the video adaptor trainers share: the prompt cache, L_align's form, the DDP step."""
from __future__ import annotations

from functools import partial

import torch

from blitext.data.pairs import Pairs
from blitext.errors import BlitextError
from blitext.losses import (ALIGN_LOSSES, alignment_loss, centred_alignment_loss, contrastive_alignment_loss,
                            reference_scales)
from blitext.pformer.prompts import PromptCache


def prompt_cache(config, pairs: Pairs) -> PromptCache | None:
    """The run's reference prompts (None without --prompts), refused unless every caption has one."""
    if not config.prompts:
        return None
    cache = PromptCache(config.prompts)
    missing = [k for k in pairs.keys if k not in cache]
    if missing:
        raise BlitextError(f"{len(missing)} of {len(pairs)} captions have no reference prompt in {config.prompts} "
                           f"(first: {missing[0]!r}); build-prompts must run on the same caption files")
    return cache


def require_align_loss(name: str) -> None:
    if name not in ALIGN_LOSSES:
        raise BlitextError(f"--align-loss {name!r}: use mse (the paper's L_align), centred (its shared and "
                           f"per-image parts, each over its size in the references) or contrastive (MSE over the "
                           f"references' spread + InfoNCE against the batch's other captions)")


def alignment(name: str, prompts: PromptCache | None, pairs: Pairs, sample: int = 4096,
              contrast_weight: float = 8.0, contrast_temp: float = 0.05, negatives: int = 0) -> tuple:
    """(L_align as a function of (prompts, reference), the reference scales it uses or None). The
    centred and contrastive forms' scales (and mean prompt) come from an evenly spaced sample of
    the run's references: at the paper's scale reading millions of (32, 2560) prompts for a few
    numbers is not worth minutes. The contrastive form's bank is `negatives` references evenly
    spaced over the run's captions (read once more: at K != sample they are not the sample's rows),
    fixed for the run (so a resumed run and every rank see the same)."""
    if name == "mse" or prompts is None:
        return alignment_loss, None
    keys = evenly_spaced(pairs.keys, max(sample, negatives))
    sampled = prompts.get_batch(keys).float()
    scales = reference_scales(sampled)
    if name == "contrastive":
        bank = prompts.get_batch(evenly_spaced(pairs.keys, negatives)).float() if negatives else None
        return partial(contrastive_alignment_loss, mean_prompt=sampled.mean(0), spread_square=scales["spread_square"],
                       weight=contrast_weight, temp=contrast_temp, negatives=bank), scales
    return partial(centred_alignment_loss, **scales), scales


def evenly_spaced(keys: list[str], n: int) -> list[str]:
    return keys[::max(1, len(keys) // n)][:n]


class StepLosses(torch.nn.Module):
    """One stage's losses as the forward of a module that owns the adaptor: DDP syncs the
    gradients of what its wrapped forward used, so every pass of the step runs inside it."""

    def __init__(self, qformer: torch.nn.Module, losses):
        super().__init__()
        self.qformer, self.losses = qformer, losses

    def forward(self, *args):
        return self.losses(*args)


def caption_record(llm, texts: list[str], sample: int = 10_000) -> dict:
    """What generation should default to for this run's captions: the text prompt it trained with
    (none: the soft prompts alone) and its captions' length in the LLM's tokens, from an evenly
    spaced sample (tokenising millions of captions for one number is not worth minutes)."""
    picked = texts[::max(1, len(texts) // sample)][:sample]
    lengths = sorted(len(ids) for ids in llm.token_ids(picked)) or [0]
    return {"prompt": "", "caption_tokens_max": lengths[-1],
            "caption_tokens_p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))], "captions_counted": len(picked)}
