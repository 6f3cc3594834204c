"""BLIP-2's weight names three ways: blitext's QFormer, transformers' Blip2 classes and LAVIS's
checkpoints. `blitext export` and `--init` from released weights both read these tables, so a
name is renamed in one place.

blitext's QFormer is built on transformers' Blip2QFormerModel and Blip2TextEmbeddings, so most
names are shared with transformers; LAVIS keeps BERT's names (`Qformer.bert.*`, `.self.`) and its
own projection names (`opt_proj`, `t5_proj`).
"""
from __future__ import annotations

import re

# blitext name prefix -> transformers name prefix (the rest of the name is the same)
TO_HF = {"llm_proj.": "language_projection.", "vision_proj.": "vision_projection.",
         "text_proj.": "text_projection.", "itm_head.": "itm_head.", "query_tokens": "query_tokens",
         "qformer.": "qformer.", "embeddings.": "embeddings."}
# blitext parts with no transformers counterpart: ITG's LM head and the contrastive temperature
# (Blip2ForImageTextRetrieval scores ITC without a temperature).
BLITEXT_ONLY = ("lm_transform.", "lm_bias", "temp")
# transformers' frozen parts that blitext loads on its own (the vision tower, the LLM)
HF_FROZEN = ("vision_model.", "language_model.")
# LAVIS's frozen parts: the ViT, its LayerNorm, the LLM
LAVIS_FROZEN = ("visual_encoder.", "ln_vision.", "opt_model.", "t5_model.", "llm_model.")
LAVIS_PROJ = re.compile(r"^(opt_proj|t5_proj|llm_proj)\.")


def to_hf(name: str) -> str | None:
    """blitext -> transformers; None for blitext-only parts."""
    if name.startswith(BLITEXT_ONLY):
        return None
    renamed = _swap_prefix(name, TO_HF.items())
    if renamed is None:
        raise KeyError(f"no transformers name for the Q-Former weight {name!r}")
    return renamed


def from_hf(name: str) -> str | None:
    """transformers -> blitext; None for the frozen parts."""
    if name.startswith(HF_FROZEN):
        return None
    return _swap_prefix(name, ((theirs, ours) for ours, theirs in TO_HF.items()))


def _swap_prefix(name: str, pairs) -> str | None:
    for old, new in pairs:
        if name.startswith(old):
            return new + name[len(old):]
    return None


def from_lavis(name: str) -> str | None:
    """LAVIS (blip2_pretrained.pth, blip2_opt, blip2_t5) -> blitext; None for the frozen parts and
    the LM head's decoder, which is tied to the word embeddings."""
    if name.startswith(LAVIS_FROZEN) or name == "Qformer.cls.predictions.decoder.weight":
        return None
    if LAVIS_PROJ.match(name):
        return LAVIS_PROJ.sub("llm_proj.", name)
    if name in ("query_tokens", "temp") or name.startswith(("vision_proj.", "text_proj.", "itm_head.")):
        return name
    if name.startswith("Qformer.cls.predictions.transform."):
        return "lm_transform." + name[len("Qformer.cls.predictions.transform."):]
    if name == "Qformer.cls.predictions.bias":
        return "lm_bias"
    if name.startswith("Qformer.bert.embeddings.LayerNorm."):
        return "qformer.layernorm." + name.rsplit(".", 1)[1]
    if name.startswith(("Qformer.bert.embeddings.word_embeddings.", "Qformer.bert.embeddings.position_embeddings.")):
        return name[len("Qformer.bert."):]
    if name.startswith("Qformer.bert.encoder.layer."):
        return "qformer." + name[len("Qformer.bert."):].replace(".self.", ".attention.")
    return None
