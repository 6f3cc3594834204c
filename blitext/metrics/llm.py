"""Metrics about the frozen LLM reading prompts: teacher-forced token accuracy."""
from __future__ import annotations

import torch

from blitext.losses import IGNORE_INDEX


@torch.no_grad()
def teacher_forced_accuracy(llm, prompts: torch.Tensor, batch) -> float:
    """Share of target tokens the frozen LLM (blitext.models.llm, either family) predicts exactly
    (argmax) given the prompts (B, P, D) and the true previous tokens of the batch's targets."""
    logits, targets = llm.target_logits(prompts, batch)  # (N, V), (N,)
    real = targets != IGNORE_INDEX
    return float((logits.argmax(-1)[real] == targets[real]).float().mean())
