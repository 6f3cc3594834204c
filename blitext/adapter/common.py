"""What the image and the video adaptor trainers share: the prompt cache, resuming, the DDP step."""
from __future__ import annotations

from pathlib import Path

import torch

from blitext.checkpoint import latest_checkpoint, load_checkpoint, resolve_resume
from blitext.console import say
from blitext.data.pairs import Pairs
from blitext.errors import BlitextError
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


def resume_run(run: Path, config, model, optimizer, identity: dict) -> int:
    """The step to start from: 0 for a new run, the checkpoint's step for --resume."""
    path = resolve_resume(run, config.resume)
    if path is None:
        if config.resume is None and latest_checkpoint(run) is not None:
            raise BlitextError(f"{run} already holds a run; pass --resume latest to continue it or another --out")
        return 0
    state = load_checkpoint(path, model, optimizer, expect=identity)
    say(f"resuming from {path} (step {state['step']})")
    return int(state["step"])


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
