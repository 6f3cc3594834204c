"""How a trained adaptor's prompts become text: each task's decoding settings (the run's recorded
caption settings or the paper's) and generation from visual tokens or from a text in the prompts'
place. `blitext generate`, `blitext eval`, and `blitext.load`'s model all decode through here.

A causal LLM reads [left padding][the adaptor's soft prompts][the text prompt], an encoder-decoder
LLM's encoder [soft prompts][text prompt </s>] (LAVIS's blip2_t5), and writes with transformers'
generate (blitext.models.llm). Captions follow what the run trained on (no text prompt, its
captions' length; `--settings run`); otherwise, and with `--settings paper`, the defaults are
docs/method.md#generation-settings: captions with "a photo of", beam 5, 8..30 new tokens;
questions as "Question: {} Short answer:", beam 5, 1..10 new tokens, length penalty -1, for either
family (LAVIS's T5 models use the same), and an answer's first token not whitespace alone
(blitext's, not LAVIS's: SmolLM2 answered 34 of 120 easy-VQA questions with a blank otherwise;
`--blank-start` allows it, as LAVIS does). Generation stops at the end-of-text marker the adaptor was
trained to emit ("\\n"; T5's </s>), which a small chat-tuned LLM otherwise talks past.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from blitext.errors import BlitextError
from blitext.models.adapter_checkpoint import LoadedAdapter
from blitext.models.llm import FrozenLLM

CAPTION_PROMPT = "a photo of"
VQA_PROMPT = "Question: {} Short answer:"


@dataclass
class GenerationSettings:
    """One task's decoding settings (docs/method.md#generation-settings by default)."""
    prompt: str = CAPTION_PROMPT       # "{}" is replaced by the question
    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 8
    length_penalty: float = 1.0
    blank_start: bool = True           # False: the first new token may not be whitespace alone (answers)

    @classmethod
    def for_task(cls, task: str, trained: dict | None = None, **overrides) -> "GenerationSettings":
        """The task's settings: captions follow what the run trained on (`trained`, the state's
        "generation" record: its text prompt, none, and its captions' token length) when given,
        else the paper's COCO settings; given overrides win."""
        base = cls(VQA_PROMPT, 5, 10, 1, -1.0, blank_start=False) if task == "vqa" else cls()
        if task == "caption" and trained:
            longest = trained["caption_tokens_max"]
            base.prompt, base.min_new_tokens = trained["prompt"], 1
            base.max_new_tokens = longest + max(2, longest // 4)  # room for the end marker and a longer caption
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        return base


SETTINGS = ("run", "paper")  # captions: as the run trained (older runs: paper) | the paper's COCO settings


def trained_settings(adapter: LoadedAdapter, settings: str) -> dict | None:
    """The run's caption record for `settings` "run" (None for runs older than the record, or "paper")."""
    require_settings(settings)
    return adapter.state.get("generation") if settings == "run" else None


def require_settings(settings: str) -> None:
    if settings not in SETTINGS:
        raise BlitextError(f"--settings {settings!r}: use run (the prompt and caption length the adaptor trained "
                           f"with) or paper (\"a photo of\", beam 5, 8..30 tokens)")


@torch.inference_mode()
def generate_texts(adapter: LoadedAdapter, llm: FrozenLLM, features: torch.Tensor, feature_mask: torch.Tensor | None,
                   texts: list[str], settings: GenerationSettings) -> list[str]:
    """One generation per row of features (B, T, D); texts are the text prompts (questions filled in)."""
    device = llm.device
    prompts = adapter.model.prompts(features.to(device).float(), None if feature_mask is None else feature_mask.to(device))
    return generate_after(llm, prompts, texts, settings, adapter.end_of_text)


@torch.inference_mode()
def generate_from_text(llm: FrozenLLM, contexts: list[str], texts: list[str], settings: GenerationSettings,
                       end_of_text: str) -> list[str]:
    """generate_texts with a text in place of each row's soft prompts: the LLM's own embeddings of
    the context's tokens fill the prompts' slot, so padding, decoding and the stop marker are the
    adaptor's own (eval vqa's text ceiling: the caption as text instead of the image)."""
    return generate_after(llm, [llm.embed_text(context) for context in contexts], texts, settings, end_of_text)


@torch.inference_mode()
def generate_after(llm: FrozenLLM, prefixes: torch.Tensor | list[torch.Tensor], texts: list[str],
                   settings: GenerationSettings, end_of_text: str) -> list[str]:
    """Decode from each row's prefix embeddings (n_i, d) and its text prompt, as the LLM's family
    reads them (blitext.models.llm); the output is cut where the LLM stops."""
    return llm.generate(prefixes, texts, end_of_text, settings.max_new_tokens, num_beams=settings.num_beams,
                        min_new_tokens=settings.min_new_tokens, length_penalty=settings.length_penalty,
                        blank_start=settings.blank_start)
