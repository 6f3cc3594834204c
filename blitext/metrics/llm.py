"""Metrics about the frozen LLM reading prompts: teacher-forced token accuracy."""
from __future__ import annotations

import torch

from blitext.losses import prompted_text_logits


@torch.no_grad()
def teacher_forced_accuracy(llm, prompts: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Share of target tokens the frozen LLM predicts exactly (argmax) given the prompts and the
    true previous tokens: prompts (B, P, D), right-padded targets (B, L)."""
    predicted = prompted_text_logits(llm, prompts, input_ids, attention_mask).argmax(-1)  # (B*L,)
    real = attention_mask.flatten().bool()
    return float((predicted[real] == input_ids.flatten()[real]).float().mean())
