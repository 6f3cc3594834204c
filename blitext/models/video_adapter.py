"""The video adaptor of the paper's section 4.5 (docs/method.md#video-adaptor): a plain Transformer, no Q-Former.

    segment features (B, T, D_in), mask (B, T)
      -> S prompt slots (B, S, D_in), slot mask (B, S)   zero-padded (T <= S) or mean-pooled in time (T > S)
      -> input_proj (B, S, H) -> BERT encoder over the slots as input embeddings (B, S, H)
      -> llm_proj -> prompts (B, S, d_llm)

S = the P-Former's n_prompt (paper: 32 slots = VATEX's at most 32 I3D segments), so L_align compares
slot k with reference slot k. The encoder is transformers' `BertModel`, initialised from a
BERT-family text encoder (bert-base in the paper, the bundled MiniLM by default) as the Q-Former is;
its word embeddings are never used (inputs are embeddings), so the vocabulary is cut to one row.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertModel

from blitext.errors import BlitextError

# Padded slots: no slot attends to them (every real segment's output is what it would be
# unpadded), but each still yields a prompt - its input is input_proj's bias plus its own
# position embedding, so it reads the real segments like a learned query. The LLM sees all S
# slots, as it saw all n_prompt of the P-Former's reference prompts, and L_align has a target
# for every slot (the reference prompt does not depend on the video's length).


class VideoAdapter(nn.Module):
    def __init__(self, config: BertConfig, d_in: int, n_prompt: int, d_llm: int):
        super().__init__()
        h = config.hidden_size
        if n_prompt > config.max_position_embeddings:
            raise BlitextError(f"{n_prompt} prompt slots > the encoder's {config.max_position_embeddings} "
                               f"positions: lower --n-prompt")
        self.config, self._n_prompt = config, n_prompt
        self.input_proj = nn.Linear(d_in, h)
        self.transformer = BertModel(config, add_pooling_layer=False)
        self.transformer.embeddings.word_embeddings.requires_grad_(False)  # unused: inputs are embeddings
        self.llm_proj = nn.Linear(h, d_llm)

    @property
    def n_prompt(self) -> int:
        """Soft prompts per video: its time slots."""
        return self._n_prompt

    @property
    def d_llm(self) -> int:
        return self.llm_proj.out_features

    def describe(self) -> dict:
        """What rebuilds this model's skeleton (saved in every checkpoint's state.json)."""
        return {"video_adapter": {"bert_config": self.config.to_dict(), "d_in": self.input_proj.in_features,
                                  "n_prompt": self.n_prompt, "d_llm": self.d_llm}}

    @classmethod
    def from_description(cls, d: dict) -> "VideoAdapter":
        v = d["video_adapter"]
        config = BertConfig(**{k: x for k, x in v["bert_config"].items()
                               if k not in ("model_type", "transformers_version", "architectures")})
        n_prompt = v["n_prompt"] if "n_prompt" in v else v["num_slots"]  # runs saved before the rename
        return cls(config, v["d_in"], n_prompt, v["d_llm"])

    # ------------------------------------------------------------ forward passes
    def segment_output(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The Transformer over the segments as given (B, T, D_in) -> (B, T, H); masked positions are never attended to."""
        embeds = self.input_proj(features)  # (B, T, H)
        att = None if mask is None else mask.long()
        return self.transformer(inputs_embeds=embeds, attention_mask=att).last_hidden_state

    def slots(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Segments (B, T, D_in) as exactly S slots (B, S, D_in) and their mask (B, S)."""
        return to_slots(features.float(), mask, self.n_prompt)

    def prompts(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The soft prompts the frozen LLM reads: (B, S, d_llm), one per slot (padded slots too, see above)."""
        slots, slot_mask = self.slots(features, mask)
        return self.llm_proj(self.segment_output(slots, slot_mask))

    # ------------------------------------------------------------ BERT initialisation
    @classmethod
    def from_text_encoder(cls, encoder, d_in: int, n_prompt: int, d_llm: int) -> "VideoAdapter":
        """The Transformer starts as the text encoder (every weight but the word embeddings and pooler)."""
        if getattr(encoder.config, "model_type", "") != "bert":
            raise BlitextError(f"the video adaptor starts from a BERT encoder; got a {encoder.config.model_type!r} "
                               f"model: pass --text-encoder with a BERT model (e.g. bert-base-uncased)")
        config = BertConfig(**{**encoder.config.to_dict(), "vocab_size": 1, "pad_token_id": 0})
        model = cls(config, d_in, n_prompt, d_llm)
        weights = {k: v for k, v in encoder.state_dict().items()
                   if not k.startswith(("embeddings.word_embeddings", "pooler."))}
        missing, unexpected = model.transformer.load_state_dict(weights, strict=False)
        if unexpected or [m for m in missing if not m.startswith("embeddings.word_embeddings")]:
            raise BlitextError(f"the text encoder's weights do not fit a BertModel: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
        return model


def to_slots(features: torch.Tensor, mask: torch.Tensor | None, n_prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D) segments -> (B, S, D) slots and (B, S) bool mask.

    A row of L <= S real segments keeps them in slots 0..L-1 (zeros and mask False after); a longer
    row is averaged into S contiguous bins of near-equal size (segment t goes to bin t*S // L), so
    every segment still counts. Rows are independent: a row's slots do not depend on the batch."""
    b, t, _ = features.shape
    lengths = mask.sum(1) if mask is not None else torch.full((b,), t, device=features.device)  # (B,)
    pos = torch.arange(t, device=features.device)  # (T,)
    real = pos[None] < lengths[:, None]  # (B, T)
    bins = torch.where(lengths[:, None] > n_prompt, pos[None] * n_prompt // lengths.clamp(min=1)[:, None],
                       pos[None])  # (B, T)
    weights = (bins[:, None, :] == torch.arange(n_prompt, device=features.device)[None, :, None]) & real[:, None]
    weights = weights.float()  # (B, S, T): 1 where segment t falls in slot s
    counts = weights.sum(-1, keepdim=True)  # (B, S, 1)
    slots = weights @ features / counts.clamp(min=1)  # (B, S, D)
    return slots, counts.squeeze(-1) > 0
