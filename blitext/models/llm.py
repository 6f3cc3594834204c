"""The frozen LLM, whatever its kind: one interface, two families.

Everything that depends on how an LLM reads soft prompts lives here: its width and input
embeddings, the token-embedding table L_vocab and check-prompts search, the loss of a target
text after soft prompts (and an optional text prefix), its stop tokens, and generation from
soft prompts plus a text prompt. The trainers, build-prompts, check-prompts, generate and eval
call these and never the transformers model's own methods.

- CausalLM, any AutoModelForCausalLM (OPT, Llama, GPT-2, the bundled SmolLM2): it reads
  [soft prompts][prefix text][target text + end_of_text] and predicts the target token by
  token; end_of_text ("\\n", the paper's OPT setup) teaches it where to stop.
- EncoderDecoderLM, any AutoModelForSeq2SeqLM (T5, Flan-T5): its encoder reads
  [soft prompts][prefix text </s>], its decoder writes [target text </s>] (BLIP-2's prefix
  language modelling, as LAVIS's blip2_t5 and the authors' pformer_t5 feed it). Every text
  ends with the tokenizer's </s>, as T5 was trained, so end_of_text is not used.

Trainers take their targets from `training_batch`: the causal family learns the whole text;
the encoder-decoder family the text split at a random word, the first part into the encoder
and the rest as the decoder's target.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from blitext.losses import IGNORE_INDEX, text_lm_loss

CAUSAL, ENCODER_DECODER = "causal", "encoder-decoder"


def family_of(config) -> str:
    """A transformers config's family: encoder-decoder models say so in their config."""
    return ENCODER_DECODER if getattr(config, "is_encoder_decoder", False) else CAUSAL


def config_width(config) -> int:
    """The input-embedding width from a config alone (stage 1 never loads the weights).
    OPT's embeddings may be narrower than its hidden size; T5 names its width d_model."""
    width = getattr(config, "word_embed_proj_dim", None) or getattr(config, "hidden_size", None) \
        or getattr(config, "d_model", None) or config.n_embd
    return int(width)


def split_at_word(text: str, draw: float, longer_prefix: bool = False) -> tuple[str, str]:
    """(prefix, rest) of a text cut after word k, k uniform over 1..n//2 by `draw` in [0, 1)
    (BLIP-2's prefix LM as the authors' stage 2 draws it), over 1..n//2 + 1 with longer_prefix
    (their pformer_t5). At least 1, where their randint(1, 0) would fail on a one-word caption:
    such a text is all prefix and its target is </s> alone. Words are split on " " and joined
    back, as theirs are."""
    words = text.split(" ")
    top = max(1, len(words) // 2 + int(longer_prefix))
    k = 1 + min(int(draw * top), top - 1)
    return " ".join(words[:k]), " ".join(words[k:])


@dataclass
class LMBatch:
    """Token ids for lm_loss, each (B, L) tensor right-padded; names are the family's own."""
    tensors: dict[str, torch.Tensor]
    truncated: int = 0  # texts that lost tokens to max_len (counted over every row, before rows())

    @property
    def loss_mask(self) -> torch.Tensor:
        """(B, L) 1 on the tokens that carry loss: what token-weighted means count."""
        return self.tensors["loss_mask"]

    def rows(self, rows) -> "LMBatch":
        return LMBatch({k: v[rows] for k, v in self.tensors.items()}, self.truncated)

    def to(self, device) -> "LMBatch":
        return LMBatch({k: v.to(device) for k, v in self.tensors.items()}, self.truncated)


def _padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) (B, L) of token lists padded on the right to the longest."""
    longest = max((len(r) for r in rows), default=0)
    ids = torch.tensor([r + [pad_id] * (longest - len(r)) for r in rows], dtype=torch.long).view(len(rows), longest)
    mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows], dtype=torch.long)
    return ids, mask.view(len(rows), longest)


@dataclass
class FrozenLLM:
    """A frozen LLM (eval mode, no gradients) and its tokenizer; subclasses are the families."""
    model: Any
    tokenizer: Any
    name: str
    fingerprint: str
    path: Path
    family: ClassVar[str] = ""
    prefix_lm: ClassVar[bool] = False  # trains on texts split into an encoder prefix and a target

    @staticmethod
    def auto_model():
        raise NotImplementedError

    @property
    def width(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def embedding_table(self) -> torch.Tensor:
        """(V, D) the input-embedding rows, detached: L_vocab's codebook and check-prompts' search."""
        return self.model.get_input_embeddings().weight.detach()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    @property
    def device(self) -> torch.device:
        return self.embedding_table.device

    def checkpoint_layers(self) -> int:
        """Recompute each layer's activations in the backward pass instead of keeping them: the
        gradient that reaches the soft prompts through the frozen LLM then costs one layer's
        activations, not all of them. transformers' own switch (gradient_checkpointing_enable)
        acts only in train mode, which would turn the frozen LLM's dropout on; this wraps the same
        layers (GradientCheckpointingLayer) in eval mode. Returns how many layers were wrapped."""
        from torch.utils.checkpoint import checkpoint
        from transformers.modeling_layers import GradientCheckpointingLayer

        def wrapped(forward):
            def run(*args, **kwargs):
                if not torch.is_grad_enabled():
                    return forward(*args, **kwargs)
                return checkpoint(forward, *args, use_reentrant=False, **kwargs)
            return run

        layers = [m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for layer in layers:
            if not getattr(layer, "_blitext_checkpointed", False):
                layer.forward, layer._blitext_checkpointed = wrapped(layer.forward), True
        return len(layers)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, without special tokens (none for an empty text); one batched call,
        as a trainer's batch of hundreds of sentences is tokenised every step."""
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False).input_ids] if texts else []

    def embed_text(self, text: str) -> torch.Tensor:
        """(n, D) the embeddings of the text's tokens: a text where the soft prompts go (eval's ceiling)."""
        return self.embed(torch.tensor(self.token_ids([text])[0], dtype=torch.long, device=self.device))

    def training_batch(self, texts: list[str], draws, end_of_text: str, max_len: int,
                       longer_prefix: bool = False) -> LMBatch:
        """A trainer's targets: the whole texts (causal), or each split at the word `draws` picks
        (one number in [0, 1) per text) into a prefix and its rest (encoder-decoder)."""
        if not self.prefix_lm:
            return self.lm_batch(texts, end_of_text, max_len)
        pairs = [split_at_word(t, float(u), longer_prefix) for t, u in zip(texts, draws)]
        return self.lm_batch([rest for _, rest in pairs], end_of_text, max_len, [p for p, _ in pairs])

    def lm_loss(self, prompts: torch.Tensor, batch: LMBatch) -> torch.Tensor:
        """Mean cross-entropy over the batch's target tokens, the prompts (B, P, D) first. The
        LLM is frozen and gets no gradient; the prompts do."""
        return text_lm_loss(*self.target_logits(prompts, batch))

    def cut(self, text: str, end_of_text: str) -> str:
        return text.strip()

    # ------------------------------------------------ what each family defines

    def lm_batch(self, targets: list[str], end_of_text: str, max_len: int,
                 prefixes: list[str] | None = None) -> LMBatch:
        raise NotImplementedError

    def target_logits(self, prompts: torch.Tensor, batch: LMBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, V), target ids (N,)) with IGNORE_INDEX where a position carries no loss."""
        raise NotImplementedError

    def stop_token_ids(self, end_of_text: str) -> list[int]:
        raise NotImplementedError

    def generate(self, prefixes, texts: list[str], end_of_text: str, max_new_tokens: int, num_beams: int = 1,
                 min_new_tokens: int | None = None, length_penalty: float = 1.0, blank_start: bool = True) -> list[str]:
        """One text per row: the LLM reads the row's prefix embeddings (B, P, D) or [(P_i, D)] (soft
        prompts, or a text's embeddings) then its text prompt; the output is cut where it should stop."""
        out = self.generate_ids(prefixes, texts, end_of_text, max_new_tokens, num_beams, min_new_tokens, length_penalty,
                                blank_start)
        return [self.cut(t, end_of_text) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def generate_ids(self, prefixes, texts: list[str], end_of_text: str, max_new_tokens: int, num_beams: int = 1,
                     min_new_tokens: int | None = None, length_penalty: float = 1.0,
                     blank_start: bool = True) -> torch.Tensor:
        """`generate`'s new token ids (B, N), padded after a row stops (what an export must reproduce).
        blank_start=False: the first new token may not be whitespace alone (blank_token_ids)."""
        embeds, mask = self.generation_inputs(prefixes, texts)
        settings = {k: v for k, v in dict(max_new_tokens=max_new_tokens, num_beams=num_beams,
                                          min_new_tokens=min_new_tokens, length_penalty=length_penalty).items()
                    if v is not None}
        if not blank_start:  # transformers' own processor, at the first new token of either family
            settings["begin_suppress_tokens"] = self.blank_token_ids
        return self.model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False,
                                   eos_token_id=self.stop_token_ids(end_of_text),
                                   pad_token_id=self.tokenizer.pad_token_id, **settings)

    def generation_inputs(self, prefixes, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) embeddings and (B, N) mask that generate hands the model: the family's layout."""
        raise NotImplementedError

    @functools.cached_property
    def blank_token_ids(self) -> list[int]:
        """The tokens whose text is whitespace alone (" ", "\\n", T5's "▁"): SmolLM2 at the VQA
        settings answers many questions with " " and then the "\\n" that ends an answer, which min
        new tokens 1 allows; an answer's first token may not be one of these (blank_start=False)."""
        texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        return [i for i, text in enumerate(texts) if not text.strip()]


class CausalLM(FrozenLLM):
    """A decoder-only LLM: [prompts][prefix][target + end_of_text], left-padded for generation."""
    family = CAUSAL

    @staticmethod
    def auto_model():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def lm_batch(self, targets, end_of_text, max_len, prefixes=None) -> LMBatch:
        """input_ids = prefix + target tokens per row (each part at most max_len), loss on the target.
        No BOS: the soft prompts are the start."""
        target = self.token_ids([t + end_of_text for t in targets])
        truncated = sum(len(t) > max_len for t in target)
        target = [t[:max_len] for t in target]
        prefix = [p[:max_len] for p in self.token_ids(prefixes)] if prefixes else [[] for _ in target]
        ids, mask = _padded([p + t for p, t in zip(prefix, target)], self.tokenizer.pad_token_id)
        loss, _ = _padded([[0] * len(p) + [1] * len(t) for p, t in zip(prefix, target)], 0)
        return LMBatch({"input_ids": ids, "attention_mask": mask, "loss_mask": loss}, truncated)

    def target_logits(self, prompts, batch):
        ids, mask = batch.tensors["input_ids"], batch.tensors["attention_mask"]
        B, P, _ = prompts.shape
        L = ids.shape[1]
        text_embeds = self.embed(ids)  # (B, L, D)
        inputs_embeds = torch.cat([prompts.to(text_embeds.dtype), text_embeds], dim=1)  # (B, P+L, D)
        full_mask = torch.cat([mask.new_ones(B, P), mask], dim=1)  # (B, P+L)
        targets = ids.masked_fill(batch.loss_mask == 0, IGNORE_INDEX)  # (B, L)
        return self._text_logits(inputs_embeds, full_mask, L), targets.flatten()

    def _text_logits(self, inputs_embeds: torch.Tensor, mask: torch.Tensor, L: int) -> torch.Tensor:
        """Logits (B*L, V) of the L positions that predict text tokens (the last prompt slot predicts
        the first), the vocabulary projection applied to those positions only: transformers'
        logits_to_keep slices a 3-D tensor first, which runs the 49k x d projection as a slow batched
        matmul (13% of a P-Former step here). Models that post-process their logits take their own path."""
        llm = self.model
        head, base = llm.get_output_embeddings(), getattr(llm, "base_model", llm)
        if head is None or base is llm or getattr(llm.config, "final_logit_softcapping", None):
            kwargs = {"logits_to_keep": L + 1} if "logits_to_keep" in inspect.signature(llm.forward).parameters else {}
            logits = llm(inputs_embeds=inputs_embeds, attention_mask=mask, use_cache=False, **kwargs).logits
            return logits[:, -(L + 1):-1].flatten(0, 1)
        # use_cache=False: no key/value cache to fill (a checkpointed layer's recompute would fill it twice)
        hidden = base(inputs_embeds=inputs_embeds, attention_mask=mask, use_cache=False).last_hidden_state
        return head(hidden[:, -(L + 1):-1].flatten(0, 1))  # (B*L, V)

    def stop_token_ids(self, end_of_text: str) -> list[int]:
        """The end-of-text marker's token (when it is one token) and the tokenizer's EOS: a chat-tuned
        LLM reproduces the caption and keeps talking past "\\n" otherwise."""
        ids = self.tokenizer(end_of_text, add_special_tokens=False).input_ids if end_of_text else []
        stops = [ids[-1]] if len(ids) == 1 else []
        if self.tokenizer.eos_token_id is not None:
            stops.append(self.tokenizer.eos_token_id)
        return stops

    def cut(self, text: str, end_of_text: str) -> str:
        return text.split(end_of_text)[0].strip() if end_of_text else text.strip()

    def generation_inputs(self, prefixes, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.left_padded(prefixes, texts)

    def left_padded(self, prefixes, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) [pads][prefix][text] and its (B, N) mask: padding goes first, so every row's real
        sequence ends at the last position, where generation continues."""
        weight = self.embedding_table
        rows = [torch.cat([p.to(weight.device, weight.dtype), self.embed_text(text)]) for p, text in zip(prefixes, texts)]
        longest = max(len(r) for r in rows)
        pad = self.embed(torch.tensor([self.tokenizer.pad_token_id], device=weight.device))[0]
        embeds = torch.stack([torch.cat([pad.expand(longest - len(r), -1), r]) for r in rows])
        mask = torch.stack([torch.arange(longest, device=weight.device) >= longest - len(r) for r in rows]).long()
        return embeds, mask


class EncoderDecoderLM(FrozenLLM):
    """An encoder-decoder LLM: encoder [prompts][prefix </s>], decoder [target </s>] (prefix LM)."""
    family = ENCODER_DECODER
    prefix_lm = True

    @staticmethod
    def auto_model():
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM

    def _with_eos(self, texts: list[str], max_len: int) -> tuple[list[list[int]], int]:
        """Token ids + </s> per text, at most max_len in all (T5's tokenizer keeps room for </s> too)."""
        ids = self.token_ids(texts)
        truncated = sum(len(t) > max_len - 1 for t in ids)
        return [t[:max_len - 1] + [self.tokenizer.eos_token_id] for t in ids], truncated

    def lm_batch(self, targets, end_of_text, max_len, prefixes=None) -> LMBatch:
        """end_of_text is not used: </s> ends every text. Without prefixes the encoder reads the
        prompts and </s> alone (reconstruction from the prompts, as generation with an empty prompt)."""
        target, t_cut = self._with_eos(targets, max_len)
        prefix, p_cut = self._with_eos(prefixes or [""] * len(targets), max_len)
        target_ids, loss_mask = _padded(target, self.tokenizer.pad_token_id)
        prefix_ids, prefix_mask = _padded(prefix, self.tokenizer.pad_token_id)
        return LMBatch({"prefix_ids": prefix_ids, "prefix_mask": prefix_mask, "target_ids": target_ids,
                        "loss_mask": loss_mask}, t_cut + p_cut)

    def target_logits(self, prompts, batch):
        t = batch.tensors
        text_embeds = self.embed(t["prefix_ids"])  # (B, Lp, D)
        inputs_embeds = torch.cat([prompts.to(text_embeds.dtype), text_embeds], dim=1)  # (B, P+Lp, D)
        mask = torch.cat([t["prefix_mask"].new_ones(prompts.shape[:2]), t["prefix_mask"]], dim=1)
        labels = t["target_ids"].masked_fill(batch.loss_mask == 0, IGNORE_INDEX)  # (B, L)
        decoder_ids = self.model.prepare_decoder_input_ids_from_labels(labels=labels)  # start token, shifted right
        logits = self.model(inputs_embeds=inputs_embeds, attention_mask=mask, decoder_input_ids=decoder_ids,
                            decoder_attention_mask=batch.loss_mask, use_cache=False).logits  # (B, L, V)
        return logits.flatten(0, 1), labels.flatten()

    def stop_token_ids(self, end_of_text: str) -> list[int]:
        return [self.tokenizer.eos_token_id]

    def generation_inputs(self, prefixes, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder_inputs(prefixes, texts)

    def encoder_inputs(self, prefixes, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) [prefix][text </s>][pads] and its (B, N) mask (the encoder reads both ways, so
        padding goes last, as LAVIS pads)."""
        weight = self.embedding_table
        ids, _ = self._with_eos(texts, 10**9)
        rows = [torch.cat([p.to(weight.device, weight.dtype), self.embed(torch.tensor(t, device=weight.device))])
                for p, t in zip(prefixes, ids)]
        longest = max(len(r) for r in rows)
        pad = self.embed(torch.tensor([self.tokenizer.pad_token_id], device=weight.device))[0]
        embeds = torch.stack([torch.cat([r, pad.expand(longest - len(r), -1)]) for r in rows])
        mask = torch.stack([torch.arange(longest, device=weight.device) < len(r) for r in rows]).long()
        return embeds, mask


FAMILIES = {CAUSAL: CausalLM, ENCODER_DECODER: EncoderDecoderLM}
