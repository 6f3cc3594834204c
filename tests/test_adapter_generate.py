"""The adaptor's pieces and generation from it: the UniLM mask, ITM negatives, the Q-Former's start
from its BERT, the command line from stage 1 to generate and check-prompts, batched generation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from blitext.models.adapter_checkpoint import LoadedAdapter
from blitext.cli.main import app
from blitext.losses import itm_negatives
from blitext.models.loading import load_text_encoder
from blitext.models.qformer import QFormer, qformer_tokenizer, unilm_mask
from adapter_world import N_PROMPT, step_lines, weights, world  # noqa: F401


# ---------------------------------------------------------------- pieces

def test_unilm_mask_on_a_small_case():
    text_mask = torch.tensor([[1, 1, 0]])  # 2 real text tokens, 1 padding
    got = unilm_mask(2, text_mask)[0].int()
    # rows: q0 q1 t0 t1 t2(pad); columns the same. Queries see queries only; text sees all
    # queries and earlier-or-same text; nobody sees the padding column.
    expected = torch.tensor([[1, 1, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 0]])
    assert torch.equal(got, expected)


def test_itm_negatives_are_never_a_positive_and_follow_the_similarity():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 10, generator=g) * 3
    positive = torch.zeros(6, 10, dtype=torch.bool)
    positive[torch.arange(6), torch.arange(6)] = True  # the pairs
    positive[0, 7] = positive[2, 9] = True             # duplicates count as matches too
    positive[5] = True                                 # a row with no negative at all
    draws = torch.stack([itm_negatives(sim, positive, torch.rand(6, generator=g))[0] for _ in range(4000)])
    found = itm_negatives(sim, positive, torch.rand(6, generator=g))[1]
    assert found.tolist() == [True] * 5 + [False]
    for row in range(5):
        assert not positive[row, draws[:, row]].any()
        want = torch.softmax(sim[row], 0).masked_fill(positive[row], 0)
        want = want / want.sum()
        seen = torch.bincount(draws[:, row], minlength=10).float() / len(draws)
        assert (seen - want).abs().max() < 0.03  # drawn in proportion to softmax(sim), as BLIP-2


def test_qformer_starts_as_the_bert_it_came_from(world):  # noqa: F811
    encoder = load_text_encoder(str(world["bert"]))
    tokenizer = qformer_tokenizer(encoder.tokenizer)
    model = QFormer.from_text_encoder(encoder.model, tokenizer, vision_width=32, n_prompt=N_PROMPT, d_llm=32).eval()
    t = tokenizer(["a red circle", "two dogs play in the grass"], padding=True, return_tensors="pt")
    torch.testing.assert_close(model.text_output(t.input_ids, t.attention_mask),
                               encoder.model.eval()(**t).last_hidden_state, rtol=1e-5, atol=1e-5)
    layer = model.qformer.encoder.layer[0]
    assert torch.equal(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)  # BLIP-2's copy
    assert hasattr(layer, "crossattention") and not hasattr(model.qformer.encoder.layer[1], "crossattention")
    assert tokenizer.bos_token == "[DEC]"
    # ITG's mask: the queries' outputs do not depend on the text at all
    feats = torch.randn(2, 5, 32)
    joint = model.joint_output(t.input_ids, feats, unilm_mask(N_PROMPT, t.attention_mask))
    torch.testing.assert_close(joint[:, :N_PROMPT], model.query_output(feats), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- generation

def test_stage2_then_generate_and_check_prompts_from_the_cli(tmp_path, world, monkeypatch):  # noqa: F811
    runner = CliRunner()
    common = ["--features", str(world["features"]), "--prompts", str(world["prompts"]), "--text-encoder",
              str(world["bert"]), "--llm", str(world["llm"]), "--batch-size", "4", "--max-steps", "2",
              "--warmup-steps", "1", "--device", "cpu"]
    r1 = runner.invoke(app, ["train-adapter", "--stage", "1", *common, "--out", str(tmp_path / "s1")])
    assert r1.exit_code == 0, r1.output
    r2 = runner.invoke(app, ["train-adapter", "--stage", "2", *common, "--init", str(tmp_path / "s1"),
                             "--out", str(tmp_path / "s2")])
    assert r2.exit_code == 0, r2.output
    lines = step_lines(tmp_path / "s2")
    assert all(m["loss"] == pytest.approx(m["lm"] + 100 * m["align"], rel=1e-5) for m in lines)  # w2 = 100
    s1, s2 = weights(tmp_path / "s1"), weights(tmp_path / "s2")
    assert torch.equal(s1["itm_head.weight"], s2["itm_head.weight"])  # stage 2 leaves the stage-1 heads alone
    assert not torch.equal(s1["llm_proj.weight"], s2["llm_proj.weight"])

    out = tmp_path / "captions.json"
    images = world["root"] / "data" / "images"
    g = runner.invoke(app, ["generate", "--adapter", str(tmp_path / "s2"), "--images", str(images / "0.png"),
                            "--images", str(images / "1.png"), "--max-new-tokens", "4", "--min-new-tokens", "1",
                            "--num-beams", "2", "--device", "cpu", "--out", str(out)])
    assert g.exit_code == 0, g.output
    results = json.loads(out.read_text())
    assert [r["image"] for r in results] == ["0.png", "1.png"] and all(isinstance(r["text"], str) for r in results)
    q = runner.invoke(app, ["generate", "--adapter", str(tmp_path / "s2"), "--images", str(world["captions"]),
                            "--limit", "3", "--question", "what colour is the shape?", "--max-new-tokens", "3",
                            "--device", "cpu", "--out", str(out)])
    assert q.exit_code == 0, q.output
    assert len(json.loads(out.read_text())) == 3

    # a stage 1 with L_align speaks to the LLM before it ever ran (captions from alignment alone);
    # one without L_align has an llm_proj that never met the LLM, and is refused
    aligned = runner.invoke(app, ["generate", "--adapter", str(tmp_path / "s1"), "--images", str(images / "0.png"),
                                  "--max-new-tokens", "2", "--device", "cpu", "--out", str(tmp_path / "a1.json")])
    assert aligned.exit_code == 0, aligned.output
    r0 = runner.invoke(app, ["train-adapter", "--stage", "1", *common, "--w-align", "0", "--out", str(tmp_path / "s0")])
    assert r0.exit_code == 0, r0.output
    refused = runner.invoke(app, ["generate", "--adapter", str(tmp_path / "s0"), "--images", str(images / "0.png")])
    assert refused.exit_code == 2 and "stage-1 adaptor trained without L_align" in refused.output
    check = runner.invoke(app, ["check-prompts", "--adapter", str(tmp_path / "s2"), "--features",
                                str(world["features"]), "--limit", "4"])
    assert check.exit_code == 0, check.output

    # captions default to what the run trained on: no text prompt, its captions' token length
    from transformers import AutoTokenizer

    from blitext.cache import FeatureCache
    from blitext.data.pairs import read_pairs
    from blitext.evaluation import decoding

    record = json.loads((tmp_path / "s2" / "final" / "state.json").read_text())["generation"]
    cache = FeatureCache(world["features"])
    texts = read_pairs([str(world["captions"])], None, lambda image_id: image_id in cache).texts
    tokenizer = AutoTokenizer.from_pretrained(world["llm"])
    longest = max(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts)
    assert record == {"prompt": "", "caption_tokens_max": longest, "caption_tokens_p95": record["caption_tokens_p95"],
                      "captions_counted": len(texts)} and 1 <= record["caption_tokens_p95"] <= longest
    used = []
    monkeypatch.setattr(decoding, "generate_texts", lambda adapter, llm, f, m, texts, settings:
                        used.append((texts, settings)) or [""] * len(texts))
    for extra in ([], ["--settings", "paper"]):
        g = runner.invoke(app, ["generate", "--adapter", str(tmp_path / "s2"), "--images", str(images / "0.png"),
                                "--device", "cpu", *extra])
        assert g.exit_code == 0, g.output
    (run_texts, run), (paper_texts, paper) = used
    assert run_texts == [""] and (run.min_new_tokens, run.max_new_tokens) == (1, longest + max(2, longest // 4))
    assert paper_texts == ["a photo of"] and (paper.min_new_tokens, paper.max_new_tokens) == (8, 30)
    bad = runner.invoke(app, ["generate", "--adapter", str(tmp_path / "s2"), "--images", str(images / "0.png"),
                              "--settings", "coco"])
    assert bad.exit_code == 2 and "--settings 'coco'" in bad.output


@pytest.mark.parametrize("kind", ["opt", "llama", "gpt2"])
def test_batched_left_padded_generation_equals_one_at_a_time(kind, llm_folders, bert_folder):
    """A row's output must not depend on its neighbours: padding goes before the prompts and is masked."""
    from blitext.evaluation.decoding import GenerationSettings, generate_texts
    from blitext.models.loading import load_llm

    torch.manual_seed(0)
    encoder = load_text_encoder(str(bert_folder))
    model = QFormer.from_text_encoder(encoder.model, qformer_tokenizer(encoder.tokenizer), 16, N_PROMPT, 32).eval()
    adapter = LoadedAdapter(model, None, {"config": {"end_of_text": "\n", "llm": "-"}}, "test", Path("."))
    llm = load_llm(str(llm_folders[kind]))
    features = torch.randn(3, 5, 16)
    texts = ["", "a red circle moves left", "two"]  # text prompts of different lengths: rows are padded
    settings = GenerationSettings(prompt="", num_beams=2, max_new_tokens=5, min_new_tokens=1, length_penalty=1.0)
    batched = generate_texts(adapter, llm, features, None, texts, settings)
    alone = [generate_texts(adapter, llm, features[i:i + 1], None, texts[i:i + 1], settings)[0] for i in range(3)]
    assert batched == alone
    # and each row's words come from its own features, not only its text: a swapped row would show
    swapped = [generate_texts(adapter, llm, features[j:j + 1], None, texts[i:i + 1], settings)[0]
               for i, j in ((0, 1), (1, 2), (2, 0))]
    assert all(a != b for a, b in zip(swapped, alone)), (swapped, alone)
