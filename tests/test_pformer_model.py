"""The P-Former model: shapes for any text length, a pure head, gradients, and the stage-0 loss end to end."""
from __future__ import annotations

import pytest
import torch

from blitext.losses import contrastive_loss, vocab_loss
from blitext.models.loading import load_llm, load_text_encoder
from blitext.models.pformer import PFormer


@pytest.fixture
def text_encoder(bert_folder):
    return load_text_encoder(str(bert_folder))


def _texts(tokenizer, length: int, batch: int = 3):
    """Random word ids behind [CLS], the last sample right-padded to half length."""
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(5, len(tokenizer), (batch, length), generator=g)  # (B, L), past the special tokens
    ids[:, 0] = tokenizer.cls_token_id
    mask = torch.ones_like(ids)
    mask[-1, length // 2:] = 0
    ids[-1, length // 2:] = tokenizer.pad_token_id
    return ids, mask


@pytest.mark.parametrize("length", [5, 40])  # shorter and longer than n_prompt
def test_output_shapes_for_any_text_length(text_encoder, length):
    pformer = PFormer(text_encoder.model, d_llm=24, n_prompt=8).eval()
    ids, mask = _texts(text_encoder.tokenizer, length)
    out = pformer(ids, mask)
    assert out.cls.shape == (3, 32)
    assert out.prompts.shape == (3, 8, 24)
    assert out.text_feat.shape == (3, 256)
    torch.testing.assert_close(out.text_feat.norm(dim=-1), torch.ones(3))
    assert (pformer.n_prompt, pformer.d_enc, pformer.d_llm) == (8, 32, 24)


def test_real_tokenizer_output_goes_in(text_encoder):
    pformer = PFormer(text_encoder.model, d_llm=24, n_prompt=8).eval()
    batch = text_encoder.tokenizer(["a red circle", "two dogs play in the grass ."], padding=True,
                                   return_tensors="pt")
    assert pformer(batch["input_ids"], batch["attention_mask"]).prompts.shape == (2, 8, 24)


def test_head_rebuilds_prompts_from_cls(text_encoder):
    pformer = PFormer(text_encoder.model, d_llm=24, n_prompt=8).eval()  # eval: no dropout between the calls
    ids, mask = _texts(text_encoder.tokenizer, 12)
    with torch.no_grad():
        out = pformer(ids, mask)
        cls = pformer.encode(ids, mask)
        torch.testing.assert_close(cls, out.cls)
        torch.testing.assert_close(pformer.head(cls), out.prompts)
        torch.testing.assert_close(pformer.head(out.cls[1:2]), out.prompts[1:2])  # per sample: no batch coupling


def test_new_layers_initialised_like_bert(text_encoder):
    pformer = PFormer(text_encoder.model, d_llm=24, n_prompt=8)
    std = text_encoder.model.config.initializer_range
    for layer in (pformer.cls_proj, pformer.pooler[0], pformer.llm_proj, pformer.text_proj):
        assert layer.bias.abs().max() == 0
        assert layer.weight.std().item() == pytest.approx(std, rel=0.25)
    assert pformer.temp.item() == pytest.approx(0.07)
    assert pformer.encoder.pooler is None  # BERT's NSP pooler is unused, so it is dropped


def test_gradients_reach_encoder_and_head(text_encoder):
    pformer = PFormer(text_encoder.model, d_llm=24, n_prompt=8)
    ids, mask = _texts(text_encoder.tokenizer, 7)
    pformer(ids, mask).prompts.square().mean().backward()
    for module in (pformer.encoder.encoder.layer[0], pformer.cls_proj, pformer.pooler, pformer.llm_proj):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_stage0_loss_trains_pformer_only(text_encoder, llm_folders):
    """L_lm + L_contrast (two views) + L_vocab: every P-Former weight gets a gradient, the LLM none."""
    llm = load_llm(str(llm_folders["opt"]))
    embedding = llm.embedding_table  # (V, d_llm)
    pformer = PFormer(text_encoder.model, d_llm=embedding.shape[1], n_prompt=8).train()
    captions = ["a red circle", "two dogs play in the grass", "a blue square moves left"]
    enc = text_encoder.tokenizer(captions, padding=True, return_tensors="pt")
    target = llm.lm_batch(captions, "\n", 32)

    view1 = pformer(enc["input_ids"], enc["attention_mask"])
    view2 = pformer(enc["input_ids"], enc["attention_mask"])  # another dropout mask: the SimCSE positive
    loss = (llm.lm_loss(view1.prompts, target)
            + contrastive_loss(view1.text_feat, view2.text_feat, pformer.temp)
            + vocab_loss(view1.prompts, embedding))
    loss.backward()

    assert torch.isfinite(loss)
    missing = [n for n, p in pformer.named_parameters() if p.grad is None]
    assert not missing  # no unused weights: DDP needs no find_unused_parameters
    assert pformer.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in llm.model.parameters())
