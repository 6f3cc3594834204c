"""blitext.pformer.check: distances of prompt vectors to the nearest token embedding, decoded."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from blitext.pformer.check import check_prompts, default_threshold, format_report, token_text
from blitext.errors import BlitextError
from conftest import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def embedding(tokenizer):
    torch.manual_seed(0)
    return 0.136 * torch.randn(len(tokenizer), 16)  # (V, D) at SmolLM2's embedding scale


def planted(tokenizer, embedding, noise=1e-3, seed=0):
    """4 examples x 5 slots of known token rows plus small noise; includes the newline token."""
    g = torch.Generator().manual_seed(seed)
    readable = [i for i in range(len(tokenizer)) if "\ufffd" not in tokenizer.decode([i])]  # whole characters
    token_ids = torch.tensor(readable)[torch.randint(0, len(readable), (4, 5), generator=g)]
    token_ids[0, 1] = tokenizer.convert_tokens_to_ids("Ċ")  # byte-level BPE's "\n"
    return embedding[token_ids] + noise * torch.randn(4, 5, embedding.shape[1], generator=g), token_ids


def test_near_token_prompts_are_within_and_decode_to_their_tokens(tokenizer, embedding):
    prompts, token_ids = planted(tokenizer, embedding)
    report = check_prompts(prompts, embedding, tokenizer, ids=["a", "b", "c", "d"], k=3, n_examples=3)
    assert report.n_vectors == 20 and report.n_prompt == 5 and report.k == 3
    assert report.fraction_within == 1.0
    assert report.mean_distance < 0.01 < report.threshold
    assert report.threshold_rule.startswith("median distance")
    assert [ex["id"] for ex in report.examples] == ["a", "b", "c"]
    for e, ex in enumerate(report.examples):
        assert len(ex["slots"]) == len(ex["distances"]) == 5
        for s, (toks, dists) in enumerate(zip(ex["slots"], ex["distances"])):
            assert len(toks) == len(dists) == 3
            assert toks[0] == repr(tokenizer.decode([int(token_ids[e, s])]))
            assert dists == sorted(dists) and dists[0] < 0.01
    newline = report.examples[0]["slots"][1][0]
    assert newline == "'\\n'" and "\n" not in newline  # escaped: one log line per slot
    text = format_report(report)
    assert "20 (4 examples x 5 slots)" in text and "100.0%" in text and "'\\n'" in text
    assert len(text.splitlines()) == 5 + 3 * (1 + 5)


def test_spread_tells_constant_prompts_from_caption_specific_ones(tokenizer, embedding):
    prompts, _ = planted(tokenizer, embedding)
    varied = check_prompts(prompts, embedding, tokenizer, n_examples=0)
    assert 0.75 < varied.spread < 0.95  # 4 independent examples: sqrt(1 - 1/4) = 0.87 expected
    assert "nearly one prompt" not in format_report(varied)
    g = torch.Generator().manual_seed(1)
    same = prompts[:1].expand(4, -1, -1) + 1e-3 * torch.randn(4, 5, 16, generator=g)
    collapsed = check_prompts(same, embedding, tokenizer, n_examples=0)
    assert collapsed.spread < 0.02 and "nearly one prompt for every example" in format_report(collapsed)
    one = check_prompts(prompts[:1], embedding, tokenizer, n_examples=0)
    assert one.spread is None and "spread" not in format_report(one)


def test_far_prompts_are_not_within(tokenizer, embedding):
    prompts, _ = planted(tokenizer, embedding)
    report = check_prompts(prompts + 5.0, embedding, tokenizer)
    assert report.fraction_within == 0.0
    assert report.mean_distance > 10 * report.threshold
    assert report.prompt_rms > 10 * report.embedding_rms


def test_percentiles_are_monotone_and_match_numpy(embedding):
    torch.manual_seed(1)
    prompts = 0.2 * torch.randn(30, 8, 16)
    report = check_prompts(prompts, embedding, k=1)
    values = list(report.percentiles.values())
    assert list(report.percentiles) == ["p5", "p25", "p50", "p75", "p95"]
    assert values == sorted(values) and values[0] < values[-1]
    nearest = torch.cdist(prompts.reshape(-1, 16), embedding).min(1).values.numpy()
    np.testing.assert_allclose(values, np.percentile(nearest, [5, 25, 50, 75, 95]), rtol=1e-5)
    np.testing.assert_allclose(report.mean_distance, nearest.mean(), rtol=1e-5)
    np.testing.assert_allclose(report.fraction_within, (nearest <= report.threshold).mean())
    np.testing.assert_allclose(report.embedding_rms, embedding.pow(2).mean().sqrt().item(), rtol=1e-5)
    assert report.examples[0]["slots"][0][0].startswith("#")  # no tokenizer: raw ids


def test_given_threshold_and_half_within(tokenizer, embedding):
    prompts, _ = planted(tokenizer, embedding)
    prompts[2:] += 5.0
    report = check_prompts(prompts.numpy(), embedding.numpy(), tokenizer, threshold=0.05, n_examples=0)
    assert report.threshold == 0.05 and report.threshold_rule == "given" and report.examples == []
    assert report.fraction_within == 0.5


def test_backends_give_the_same_report(tokenizer, embedding):
    prompts, _ = planted(tokenizer, embedding, noise=0.05)
    a = check_prompts(prompts, embedding, tokenizer, backend="faiss")
    b = check_prompts(prompts, embedding, tokenizer, backend="torch")
    assert a.examples == b.examples and a.fraction_within == b.fraction_within
    np.testing.assert_allclose(list(a.percentiles.values()), list(b.percentiles.values()), rtol=1e-6)


def test_default_threshold_ignores_duplicate_rows():
    torch.manual_seed(2)
    emb = torch.randn(500, 8)
    nn = torch.cdist(emb, emb).fill_diagonal_(float("inf")).min(1).values
    assert default_threshold(emb) == pytest.approx(nn.median().item(), rel=0.02)
    emb[:10] = emb[10]  # a few identical rows (e.g. untrained padding tokens)
    assert default_threshold(emb) > 0.5 * nn.median().item()
    with pytest.raises(BlitextError, match="fewer than 2 rows"):
        default_threshold(emb[:1])


def test_token_text_is_readable(tokenizer):
    space = tokenizer.encode(" red")[0]
    assert token_text(tokenizer, space) == "' '"  # byte-level "Ġ" shown as the space it is
    half = tokenizer.convert_tokens_to_ids("Ø")  # first byte of a 2-byte character: decodes to U+FFFD alone
    assert "\ufffd" in tokenizer.decode([half]) and token_text(tokenizer, half) == "'Ø'"
    assert token_text(None, 7) == "#7"


def test_bad_inputs_are_refused(embedding):
    with pytest.raises(BlitextError, match=r"\(examples, slots, dim\).*\(5, 16\)"):
        check_prompts(torch.zeros(5, 16), embedding)
    with pytest.raises(BlitextError, match=r"\(2, 3, 12\).*\(.*, 16\)"):
        check_prompts(torch.zeros(2, 3, 12), embedding)
    with pytest.raises(BlitextError, match="3 ids for 2 examples"):
        check_prompts(torch.zeros(2, 3, 16), embedding, ids=[1, 2, 3])
    with pytest.raises(BlitextError, match="threshold=0"):
        check_prompts(torch.zeros(2, 3, 16), embedding, threshold=0)


@pytest.mark.slow
def test_real_smollm2_embedding(session_cache, monkeypatch):
    """SmolLM2-135M's real table: its scale, and noisy copies of real tokens decode back to them."""
    from blitext.models.loading import load_llm

    monkeypatch.setenv("BLITEXT_CACHE", str(session_cache))
    llm = load_llm("smollm2-135m")
    embedding = llm.embedding_table                                          # (49152, 576)
    token_ids = llm.tokenizer(["The capital of France is Paris.\n"], return_tensors="pt").input_ids  # (1, P)
    torch.manual_seed(0)
    prompts = embedding[token_ids].detach() + 0.005 * torch.randn(*token_ids.shape, 576)
    random = 0.136 * torch.randn_like(prompts)  # random vectors at the table's own scale
    report = check_prompts(torch.cat([prompts, random]), embedding, llm.tokenizer)
    assert report.embedding_rms == pytest.approx(0.136, abs=0.005)
    # measured: threshold 2.0, row norms ~3.2, random same-scale vectors 3.5-3.8 from any token
    assert 0.5 < report.threshold < embedding.norm(dim=1).median().item()
    assert report.fraction_within == 0.5  # the noisy copies, not the random vectors
    slots = [toks[0] for toks in report.examples[0]["slots"]]
    assert slots == [repr(llm.tokenizer.decode([int(t)])) for t in token_ids[0]]
    assert "' Paris'" in slots and "'\\n'" in slots
    print(format_report(report))
