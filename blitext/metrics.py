"""Metrics: one place for every number blitext reports about model quality."""
from __future__ import annotations

import torch


@torch.no_grad()
def teacher_forced_accuracy(llm, prompts: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Share of target tokens the frozen LLM predicts exactly (argmax) given the prompts and the
    true previous tokens: prompts (B, P, D), right-padded targets (B, L)."""
    embeds = llm.get_input_embeddings()(input_ids)                       # (B, L, D)
    inputs = torch.cat([prompts.to(embeds.dtype), embeds], dim=1)        # (B, P + L, D)
    mask = torch.cat([torch.ones(prompts.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device),
                      attention_mask], dim=1)
    logits = llm(inputs_embeds=inputs, attention_mask=mask).logits       # (B, P + L, V)
    p = prompts.shape[1]
    predicted = logits[:, p - 1:-1].argmax(-1)                           # position p-1 predicts token 0
    real = attention_mask.bool()
    return float((predicted[real] == input_ids[real]).float().mean())
