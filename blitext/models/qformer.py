"""BLIP-2's Q-Former as the image adaptor (docs/method.md#the-q-former-adaptor), on transformers' Blip2QFormerModel.

transformers provides the architecture: the layers with their separate query/text
feed-forward weights and cross-attention to the visual tokens every 2nd layer
(`Blip2QFormerModel`, text branch on with `use_qformer_text_input=True`) and the text
embeddings (`Blip2TextEmbeddings`). It has no stage-1 heads and no BERT initialisation,
so this module adds only those: the 32 learnable queries, `vision_proj`/`text_proj` (ITC),
`itm_head` (ITM), an LM head tied to the word embeddings (ITG), `llm_proj` (the soft prompts
for the frozen LLM) and the contrastive temperature.

    visual tokens (B, T, D_vis) --cross-attn--> queries (B, Q, H) -> llm_proj -> prompts (B, Q, d_llm)
    text ids (B, L) -> text_output (B, L, H); [CLS] -> text_proj (ITC)
    queries + text, joint (B, Q+L, H) under a bidirectional (ITM) or UniLM (ITG) mask

`from_text_encoder` builds it from a BERT-family encoder the way BLIP-2 does from
bert-base: every BERT weight copied, the query feed-forward copied from the text one,
cross-attention new, and a [DEC] token added to the vocabulary for captioning.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from blitext.errors import BlitextError

DEC_TOKEN = "[DEC]"  # BLIP-2's first token of a caption for ITG, added to the encoder's vocabulary

# The parts each stage trains (prefixes of parameter names); the rest is frozen in that
# stage, so DDP sees no unused parameters and AdamW's weight decay leaves them alone.
QUERY_PATH = ("query_tokens", "qformer.layernorm", "qformer.encoder")
STAGE1_HEADS = ("embeddings.", "vision_proj", "text_proj", "itm_head", "lm_transform", "lm_bias", "temp")


class QFormer(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, n_prompt: int, d_llm: int, embed_dim: int = 256,
                 temp: float = 0.07):
        super().__init__()
        if not config.use_qformer_text_input:
            raise BlitextError("the Q-Former needs its text branch: build it with use_qformer_text_input=True")
        h = config.hidden_size
        self.config = config
        self.embeddings = Blip2TextEmbeddings(config)
        self.qformer = Blip2QFormerModel(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, n_prompt, h).normal_(0.0, config.initializer_range))
        self.vision_proj = nn.Linear(h, embed_dim)
        self.text_proj = nn.Linear(h, embed_dim)
        self.itm_head = nn.Linear(h, 2)
        self.lm_transform = BertPredictionHeadTransform(config)
        self.lm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.llm_proj = nn.Linear(h, d_llm)
        self.temp = nn.Parameter(torch.tensor(float(temp)))

    @property
    def n_prompt(self) -> int:
        """Soft prompts per image: one per learnable query (BLIP-2's num_query_token)."""
        return self.query_tokens.shape[1]

    @property
    def d_llm(self) -> int:
        return self.llm_proj.out_features

    def describe(self) -> dict:
        """What rebuilds this model's skeleton (saved in every checkpoint's state.json)."""
        return {"qformer_config": self.config.to_dict(), "n_prompt": self.n_prompt, "d_llm": self.d_llm,
                "embed_dim": self.vision_proj.out_features}

    @classmethod
    def from_description(cls, d: dict) -> "QFormer":
        config = Blip2QFormerConfig(**{k: v for k, v in d["qformer_config"].items()
                                       if k not in ("model_type", "transformers_version", "architectures")})
        n_prompt = d["n_prompt"] if "n_prompt" in d else d["num_query"]  # runs saved before the rename
        return cls(config, n_prompt, d["d_llm"], d["embed_dim"])

    # ------------------------------------------------------------ forward passes
    def query_output(self, features: torch.Tensor, feature_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Queries after cross-attending to the visual tokens: (B, Q, H). Queries see only each other."""
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=features,
                            encoder_attention_mask=feature_mask).last_hidden_state

    def prompts(self, features: torch.Tensor, feature_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The soft prompts the frozen LLM reads: llm_proj(query outputs), (B, Q, d_llm)."""
        return self.llm_proj(self.query_output(features, feature_mask))

    def text_output(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text alone, no queries and no image (the ITC text encoder): (B, L, H)."""
        embeds = self.embeddings(input_ids=input_ids)
        return self.qformer(query_embeds=embeds, query_length=0, attention_mask=attention_mask).last_hidden_state

    def joint_output(self, input_ids: torch.Tensor, features: torch.Tensor, attention_mask: torch.Tensor,
                     feature_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Queries followed by text, (B, Q+L, H). attention_mask is (B, Q+L) for ITM (every token sees
        every token) or a (B, Q+L, Q+L) boolean matrix such as `unilm_mask` for ITG."""
        queries = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)
        if attention_mask.dim() == 3:  # transformers takes a prepared 4-D additive mask as is
            attention_mask = additive_mask(attention_mask, embeds.dtype)
        return self.qformer(query_embeds=embeds, query_length=self.n_prompt, attention_mask=attention_mask,
                            encoder_hidden_states=features, encoder_attention_mask=feature_mask).last_hidden_state

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """ITG's LM head, its decoder tied to the word embeddings (as BERT's MLM head): (..., vocab)."""
        return F.linear(self.lm_transform(hidden), self.embeddings.word_embeddings.weight, self.lm_bias)

    # ------------------------------------------------------------ stages
    def train_only(self, stage: int, align: bool) -> list[str]:
        """Freeze what `stage` does not use; returns the trainable parameter names.

        Stage 1 trains everything but llm_proj, which it trains only for the alignment loss.
        Stage 2 trains the query path and llm_proj (the text branch and stage-1 heads are idle).
        """
        for name, p in self.named_parameters():
            if stage == 1:
                p.requires_grad_(not name.startswith("llm_proj") or align)
            else:
                p.requires_grad_(name.startswith(QUERY_PATH + ("llm_proj",)) and not text_ffn(name))
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------ BERT initialisation
    @classmethod
    def from_text_encoder(cls, encoder, tokenizer, vision_width: int, n_prompt: int, d_llm: int,
                          cross_attention_frequency: int = 2, embed_dim: int = 256) -> "QFormer":
        """A Q-Former initialised from a BERT-family encoder (bert-base in the paper, MiniLM by default).

        `tokenizer` must already hold the [DEC] token (`qformer_tokenizer`)."""
        bert = encoder.config
        if getattr(bert, "model_type", "") not in ("bert", "roberta", "xlm-roberta", "electra"):
            raise BlitextError(f"the Q-Former starts from a BERT-style encoder; got a {bert.model_type!r} model: "
                               f"pass --text-encoder with a BERT-family model (e.g. bert-base-uncased)")
        config = Blip2QFormerConfig(
            vocab_size=max(len(tokenizer), bert.vocab_size), hidden_size=bert.hidden_size, num_hidden_layers=bert.num_hidden_layers,
            num_attention_heads=bert.num_attention_heads, intermediate_size=bert.intermediate_size,
            hidden_act=bert.hidden_act, hidden_dropout_prob=bert.hidden_dropout_prob,
            attention_probs_dropout_prob=bert.attention_probs_dropout_prob,
            max_position_embeddings=bert.max_position_embeddings, layer_norm_eps=bert.layer_norm_eps,
            pad_token_id=tokenizer.pad_token_id, cross_attention_frequency=cross_attention_frequency,
            encoder_hidden_size=vision_width, use_qformer_text_input=True,
            initializer_range=getattr(bert, "initializer_range", 0.02))
        model = cls(config, n_prompt, d_llm, embed_dim)
        model.load_bert(encoder.state_dict())
        return model

    def load_bert(self, bert: dict[str, torch.Tensor]) -> None:
        """Copy BERT weights onto the Q-Former's names, as BLIP-2 initialises from bert-base."""
        own = self.state_dict()
        loaded = {}
        for name, tensor in bert.items():
            target = _bert_to_qformer(name)
            if target is None or target not in own:
                continue
            if target == "embeddings.word_embeddings.weight":  # the vocabulary grew by [DEC]
                grown = own[target].clone()
                grown[:tensor.shape[0]] = tensor
                tensor = grown
            loaded[target] = tensor
        if "embeddings.token_type_embeddings.weight" in bert:
            # Blip2TextEmbeddings has no token types; BERT always added type 0, so fold it into
            # the positions to keep the pretrained function (LAVIS drops it instead).
            loaded["embeddings.position_embeddings.weight"] = (
                loaded["embeddings.position_embeddings.weight"] + bert["embeddings.token_type_embeddings.weight"][0])
        for name in list(loaded):  # queries get their own feed-forward, starting as the text one (BLIP-2)
            if text_ffn(name):
                loaded[name.replace(".intermediate.", ".intermediate_query.").replace(".output.", ".output_query.")] = loaded[name]
        missing = [n for n in own if n not in loaded and n.startswith("qformer.encoder") and "crossattention" not in n]
        if missing:
            raise BlitextError(f"the text encoder's weights do not fit the Q-Former layout: {missing[:3]} missing")
        self.load_state_dict(loaded, strict=False)


def keep_first_layers(encoder, n: int, name: str) -> None:
    """Cut a BERT-style encoder to its first n layers (a shallower Q-Former from the same start)."""
    have = encoder.config.num_hidden_layers
    if not 0 < n <= have:
        raise BlitextError(f"--num-layers {n}: the text encoder {name} has {have} layers; pass 1..{have}")
    encoder.encoder.layer = encoder.encoder.layer[:n]
    encoder.config.num_hidden_layers = n


def text_ffn(name: str) -> bool:
    return ".intermediate." in name or (".output." in name and ".attention." not in name
                                        and ".crossattention." not in name)


def _bert_to_qformer(name: str) -> str | None:
    """BertModel parameter name -> QFormer name (None: not used)."""
    name = name.removeprefix("bert.")
    if name.startswith(("embeddings.word_embeddings", "embeddings.position_embeddings")):
        return name
    if name.startswith("embeddings.LayerNorm."):
        return "qformer.layernorm." + name.rsplit(".", 1)[1]
    if name.startswith("encoder.layer."):
        return "qformer." + name.replace(".attention.self.", ".attention.attention.")
    return None


def qformer_tokenizer(tokenizer):
    """The encoder's tokenizer with [DEC] as its bos token (BLIP-2's captioning start token)."""
    if tokenizer.bos_token != DEC_TOKEN:
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, N, N) boolean 'may attend' -> (B, 1, N, N) additive mask for every attention backend."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


def unilm_mask(n_prompt: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITG's attention (B, Q+L, Q+L), True where row may attend to column (BLIP-2, UniLM-style):
    queries see every query and no text; text token t sees every query and text tokens <= t;
    padding columns (text_mask 0) are never seen."""
    b, L = text_mask.shape
    n = n_prompt + L
    allowed = torch.zeros(n, n, dtype=torch.bool, device=text_mask.device)
    allowed[:, :n_prompt] = True
    allowed[n_prompt:, n_prompt:] = torch.ones(L, L, dtype=torch.bool, device=text_mask.device).tril()
    columns = torch.cat([text_mask.new_ones(b, n_prompt), text_mask], dim=1).bool()  # (B, Q+L)
    return allowed[None] & columns[:, None, :]
