"""P-Former: the text-only prompt generator of stage 0 (docs/method.md#p-former-architecture).

Follows the paper's "Bootstrapping Vision-Language Learning with Decoupled Language
Pre-training": a BERT-style encoder reads a sentence, its [CLS] hidden state is the
sentence bottleneck, and a small head expands that one vector into n_prompt soft prompts
in the frozen LLM's input-embedding space. Trained so the LLM reconstructs the sentence
from the prompts (plus a contrastive and a vocabulary term, see blitext/losses.py), the
P-Former later supplies the reference prompts the vision adaptor is aligned to.

    text -> encoder -> [CLS] (B, d_enc)
         -> cls_proj -> (B, n_prompt, d_enc) -> pooler (Linear+Tanh per slot)
         -> llm_proj -> prompts (B, n_prompt, d_llm)
    [CLS] -> text_proj -> L2-normalise -> text_feat (B, contrast_dim)   (contrastive loss)

The head is a pure function of [CLS] (`head`), so a cache of [CLS] vectors is enough to
rebuild every prompt. Unlike the authors' code, the number of prompts does not depend on
the text length: any length works.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn


@dataclass
class PFormerOutput:
    cls: torch.Tensor        # (B, d_enc) [CLS] hidden state: the sentence bottleneck
    prompts: torch.Tensor    # (B, n_prompt, d_llm) soft prompts in the LLM's input-embedding space
    text_feat: torch.Tensor  # (B, contrast_dim) L2-normalised text_proj([CLS]), for the contrastive loss


class PFormer(nn.Module):
    """BERT-style encoder; [CLS] -> cls_proj -> (B, n_prompt, d_enc) -> pooler -> llm_proj -> (B, n_prompt, d_llm)."""

    def __init__(self, encoder: transformers.PreTrainedModel, d_llm: int, n_prompt: int = 32,
                 contrast_dim: int = 256, temp: float = 0.07):
        super().__init__()
        d_enc = encoder.config.hidden_size
        if getattr(encoder, "pooler", None) is not None:
            # BERT's own pooler (NSP head) is unused: the bottleneck is the raw [CLS] state.
            # Dropping it keeps DDP from waiting on weights that never get a gradient
            # (LAVIS builds its encoders with add_pooling_layer=False for the same reason).
            encoder.pooler = None
        self.encoder = encoder
        self.cls_proj = nn.Linear(d_enc, n_prompt * d_enc)
        self.pooler = nn.Sequential(nn.Linear(d_enc, d_enc), nn.Tanh())
        self.llm_proj = nn.Linear(d_enc, d_llm)
        self.text_proj = nn.Linear(d_enc, contrast_dim)
        self.temp = nn.Parameter(torch.tensor(float(temp)))  # learnable contrastive temperature
        self._n_prompt = n_prompt
        std = getattr(encoder.config, "initializer_range", 0.02)
        for layer in (self.cls_proj, self.pooler[0], self.llm_proj, self.text_proj):
            nn.init.normal_(layer.weight, std=std)  # as BERT initialises its own Linear layers
            nn.init.zeros_(layer.bias)

    @property
    def n_prompt(self) -> int:
        return self._n_prompt

    @property
    def d_enc(self) -> int:
        return self.llm_proj.in_features

    @property
    def d_llm(self) -> int:
        return self.llm_proj.out_features

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The [CLS] hidden state (B, d_enc) of texts (B, L), any L."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, d_enc)
        return hidden[:, 0]  # (B, d_enc)

    def head(self, cls: torch.Tensor) -> torch.Tensor:
        """Soft prompts (B, n_prompt, d_llm) from [CLS] states (B, d_enc); a pure function of cls."""
        slots = self.cls_proj(cls).view(cls.shape[0], self.n_prompt, self.d_enc)  # (B, P, d_enc)
        return self.llm_proj(self.pooler(slots))  # (B, P, d_llm)

    def contrast_features(self, cls: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(cls), dim=-1)  # (B, contrast_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PFormerOutput:
        cls = self.encode(input_ids, attention_mask)  # (B, d_enc)
        return PFormerOutput(cls=cls, prompts=self.head(cls), text_feat=self.contrast_features(cls))
