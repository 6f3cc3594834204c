"""The encoder-decoder family (T5, Flan-T5) on tiny random T5s saved to folders, loaded as users load them.

The P-Former learns through T5 as the authors' pformer_t5 (the prompts and a sentence's first words
into the encoder, the rest from the decoder); stage 2 is BLIP-2's prefix LM; generation puts the text
prompt into the encoder after the soft prompts (LAVIS's blip2_t5) and stops at </s>.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from blitext.adapter.image import AdapterLoop, train_adapter
from blitext.cli.main import app
from blitext.errors import BlitextError
from blitext.features.image import ExtractConfig, extract_features
from blitext.models.llm import CausalLM, EncoderDecoderLM, split_at_word
from blitext.models.loading import llm_family, llm_width, load_llm
from blitext.pformer.prompts import BuildPromptsConfig, PromptCache, build_prompts
from blitext.pformer.train import PFormerConfig, TrainLoop, train_pformer
from blitext.training import read_metrics
from adapter_world import config, stop_at_step, write_images
from test_pformer_train import dropout_free_bert, tiny_config

BIN = Path(sys.executable).parent
WORDS = ["a red circle", "a blue square moves left", "two dogs play", "the circle moves right", "a photo of",
         "question what colour is the shape short answer", "the square moves left"]


def word_tokenizer(folder: Path):
    """A BPE tokenizer whose words are single tokens, with T5's ids (<pad> 0, </s> 1, <unk> 2) and </s>
    appended as T5's tokenizer does (blitext adds its own special tokens, so a causal LLM can share it)."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(WORDS * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def make_t5_folder(folder: Path) -> Path:
    """A tiny random T5 in Flan-T5's layout (gated-GELU, untied head), saved as a hub checkpoint is."""
    import transformers as tf

    vocab = max(len(word_tokenizer(folder)), 300)
    config = tf.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                         num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                         pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    tf.T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def make_word_opt_folder(folder: Path) -> Path:
    """A tiny OPT on the same word tokens, initialised wide enough (std 0.2) that soft prompts steer it."""
    import transformers as tf

    vocab = max(len(word_tokenizer(folder)), 300)
    config = tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=vocab,
                          word_embed_proj_dim=32, max_position_embeddings=128, init_std=0.2, pad_token_id=0,
                          bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    tf.OPTForCausalLM(config).save_pretrained(folder)
    return folder


def step_lines(run: Path) -> list[dict]:
    return [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]


def cli(*args: str) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def t5world(tmp_path_factory, vision_folders, bert_folder) -> dict:
    """Images, their cached features, a tiny T5, a P-Former trained for it and its prompts, all via the CLI."""
    root = tmp_path_factory.mktemp("t5")
    bert = dropout_free_bert(bert_folder, root / "bert")
    t5 = make_t5_folder(root / "t5")
    captions = write_images(root / "data")
    features = root / "features"
    extract_features(ExtractConfig(data=str(captions), out=str(features), vision_encoder=str(vision_folders["vit"]),
                                   batch_size=4, shard_size=8, num_workers=0, device="cpu"))
    (root / "pformer.json").write_text(json.dumps({"log_every": 1, "lr": 1e-3}))
    cli("train-pformer", "--text", captions, "--llm", t5, "--text-encoder", bert, "--batch-size", 4, "--max-steps", 30,
        "--n-prompt", 4, "--heldout", 2, "--warmup-steps", 1, "--sample-every", 1000, "--device", "cpu",
        "--config", root / "pformer.json", "--out", root / "pformer")
    cli("build-prompts", "--pformer", root / "pformer", "--captions", captions, "--out", root / "prompts",
        "--batch-size", 4, "--shard-size", 8, "--device", "cpu")
    return {"root": root, "bert": bert, "captions": captions, "features": features, "prompts": root / "prompts",
            "llm": t5, "pformer": root / "pformer"}


# ---------------------------------------------------------------- pieces

def test_split_at_a_random_word():
    assert split_at_word("a red circle moves left", 0.0) == ("a", "red circle moves left")
    assert split_at_word("a red circle moves left", 0.99) == ("a red", "circle moves left")  # k <= n // 2
    assert split_at_word("a red circle moves left", 0.99, longer_prefix=True) == ("a red circle", "moves left")
    assert split_at_word("circle", 0.7) == ("circle", "")  # all prefix: the target is </s> alone
    assert split_at_word("two dogs", 0.99, longer_prefix=True) == ("two dogs", "")  # as pformer_t5 can


def test_the_family_comes_from_the_config_and_the_loss_is_t5s_own(t5world, llm_folders):
    t5 = load_llm(str(t5world["llm"]))
    assert isinstance(t5, EncoderDecoderLM) and t5.family == llm_family(str(t5world["llm"])) == "encoder-decoder"
    assert t5.width == llm_width(str(t5world["llm"])) == 32 and t5.embedding_table.shape[1] == 32
    assert isinstance(load_llm(str(llm_folders["opt"])), CausalLM) and llm_family("smollm2-135m") == "causal"
    assert not any(p.requires_grad for p in t5.model.parameters())

    batch = t5.training_batch(["a red circle moves left", "two dogs"], [0.99, 0.0], "\n", 32, longer_prefix=True)
    prompts = torch.randn(2, 3, 32, requires_grad=True)
    loss = t5.lm_loss(prompts, batch)
    total, count = 0.0, 0
    for prefix, rest, row in (("a red circle", "moves left", 0), ("two", "dogs", 1)):  # each row alone, unpadded
        encoder = torch.cat([prompts[row].detach(), t5.embed(torch.tensor(t5.tokenizer(prefix).input_ids))])
        labels = torch.tensor([t5.tokenizer(rest).input_ids])  # T5's tokenizer appends </s>
        total += t5.model(inputs_embeds=encoder[None], labels=labels).loss.item() * labels.numel()
        count += labels.numel()
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    loss.backward()
    assert prompts.grad.abs().sum() > 0 and all(p.grad is None for p in t5.model.parameters())
    assert t5.stop_token_ids("\n") == [t5.tokenizer.eos_token_id]  # "\n" is no stop token for T5


@pytest.mark.parametrize("kind", ["t5", "opt"])
def test_generation_stops_where_it_should(kind, tmp_path, t5world):
    """Prompts fitted to two texts: greedy decoding writes each and stops (T5 at </s>, a causal LLM at the
    end-of-text marker), with room for 20 more tokens."""
    llm = load_llm(str(t5world["llm"] if kind == "t5" else make_word_opt_folder(tmp_path / "opt")))
    texts = ["a red circle", "two dogs play"]
    target = llm.lm_batch(texts, "\n", 32)
    torch.manual_seed(0)
    prompts = torch.nn.Parameter(0.1 * torch.randn(2, 8, llm.width))
    optimizer = torch.optim.Adam([prompts], lr=0.2)
    for _ in range(300):
        optimizer.zero_grad()
        llm.lm_loss(prompts, target).backward()
        optimizer.step()
    assert llm.generate(prompts.detach(), ["", ""], "\n", 24) == texts
    if kind == "opt":  # "\n" is one token here: it ends generation (the cut at "\n" alone would hide a ramble)
        assert llm.stop_token_ids("\n") == [llm.tokenizer("\n", add_special_tokens=False).input_ids[0], 1]
    else:  # the decoder itself ended with </s>, before max_new_tokens
        embeds, mask = llm.encoder_inputs(prompts.detach(), ["", ""])
        out = llm.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=24, do_sample=False,
                                 eos_token_id=llm.stop_token_ids("\n"), pad_token_id=0)
        assert out.shape[1] < 24 and all(llm.tokenizer.eos_token_id in row for row in out.tolist())


@pytest.mark.parametrize("kind", ["t5", "opt"])
def test_an_answer_does_not_start_with_a_blank_token(kind, tmp_path, t5world):
    """blank_start=False (answers' default) keeps blank_token_ids from the first new token, at beam 5
    as answers decode: transformers' begin_suppress_tokens, whose first step is the decoder's second
    position for T5 and the first for a causal LLM fed embeddings alone."""
    llm = load_llm(str(t5world["llm"] if kind == "t5" else make_word_opt_folder(tmp_path / "opt")))
    prompts = torch.randn(4, 4, llm.width, generator=torch.Generator().manual_seed(0))
    first = 1 if kind == "t5" else 0  # T5's output starts with its decoder start token
    free = llm.generate_ids(prompts, [""] * 4, "\n", 3, num_beams=5, min_new_tokens=1)[:, first].tolist()
    llm.__dict__["blank_token_ids"] = sorted(set(free))  # as if the tokens it starts with were blank
    held = llm.generate_ids(prompts, [""] * 4, "\n", 3, num_beams=5, min_new_tokens=1, blank_start=False)
    assert not set(held[:, first].tolist()) & set(free)
    again = llm.generate_ids(prompts, [""] * 4, "\n", 3, num_beams=5, min_new_tokens=1, blank_start=True)
    assert again[:, first].tolist() == free


def test_blank_tokens_are_the_whitespace_ones(llm_folders):
    llm = load_llm(str(llm_folders["opt"]))
    ids = lambda text: llm.tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    assert ids(" ")[0] in llm.blank_token_ids and ids("\n")[0] in llm.blank_token_ids
    assert ids("a")[0] not in llm.blank_token_ids and llm.tokenizer.eos_token_id not in llm.blank_token_ids


# ---------------------------------------------------------------- runs

def test_flan_t5_end_to_end_through_the_cli(tmp_path, t5world):
    w = t5world
    lm = [m["lm"] for m in step_lines(w["pformer"])]
    assert sum(lm[-5:]) / 5 < sum(lm[:5]) / 5, lm  # the P-Former's prefix-LM loss falls
    assert json.loads((w["pformer"] / "final" / "state.json").read_text())["llm_family"] == "encoder-decoder"
    assert PromptCache(w["prompts"]).producer["llm_family"] == "encoder-decoder"

    common = ["--features", w["features"], "--prompts", w["prompts"], "--text-encoder", w["bert"], "--llm", w["llm"],
              "--batch-size", 4, "--warmup-steps", 1, "--device", "cpu"]
    cli("train-adapter", "--stage", 1, *common, "--max-steps", 2, "--out", tmp_path / "s1")
    (tmp_path / "s2.json").write_text(json.dumps({"log_every": 1, "lr": 1e-3, "w_align": 0}))
    cli("train-adapter", "--stage", 2, *common, "--max-steps", 20, "--init", tmp_path / "s1",
        "--config", tmp_path / "s2.json", "--out", tmp_path / "s2")
    lm = [m["lm"] for m in step_lines(tmp_path / "s2")]
    assert sum(lm[-5:]) / 5 < sum(lm[:5]) / 5, lm  # stage 2's prefix-LM loss falls

    images = w["root"] / "data" / "images"
    cli("generate", "--adapter", tmp_path / "s2", "--images", images / "0.png", "--images", images / "1.png",
        "--max-new-tokens", 4, "--min-new-tokens", 1, "--num-beams", 2, "--device", "cpu", "--out",
        tmp_path / "captions.json")
    assert [r["image"] for r in json.loads((tmp_path / "captions.json").read_text())] == ["0.png", "1.png"]
    cli("generate", "--adapter", tmp_path / "s2", "--images", w["captions"], "--limit", 2, "--question",
        "what colour is the shape?", "--max-new-tokens", 3, "--device", "cpu", "--out", tmp_path / "answers.json")
    assert len(json.loads((tmp_path / "answers.json").read_text())) == 2
    cli("eval", "caption", "--adapter", tmp_path / "s2", "--features", w["features"], "--data", w["captions"],
        "--limit", 4, "--max-new-tokens", 4, "--num-beams", 2, "--min-new-tokens", 1, "--tokenizer", "python",
        "--meteor", "off", "--spice", "off", "--device", "cpu", "--out", tmp_path / "eval")
    assert "CIDEr" in json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    cli("check-prompts", "--prompts", w["prompts"], "--limit", 4, "--out", tmp_path / "check.json")
    assert json.loads((tmp_path / "check.json").read_text())["n_prompt"] == 4


def test_resume_replays_exactly(tmp_path, t5world, monkeypatch):
    w = t5world
    settings = dict(max_steps=4, save_every=2, max_text_len=12)
    train_pformer(tiny_config(w["captions"], tmp_path / "a", w["llm"], w["bert"], **settings))
    real = TrainLoop.train_step
    monkeypatch.setattr(TrainLoop, "train_step",
                        lambda self, step, steps, batch=None: (_ for _ in ()).throw(KeyboardInterrupt) if step == 3
                        else real(self, step, steps, batch))
    with pytest.raises(KeyboardInterrupt):
        train_pformer(tiny_config(w["captions"], tmp_path / "b", w["llm"], w["bert"], **settings))
    monkeypatch.setattr(TrainLoop, "train_step", real)
    train_pformer(tiny_config(w["captions"], tmp_path / "b", w["llm"], w["bert"], resume="latest", **settings))
    keys = ("lm", "contrast", "vocab", "loss", "lr")
    assert [{k: m[k] for k in keys} for m in step_lines(tmp_path / "a")] == \
        [{k: m[k] for k in keys} for m in step_lines(tmp_path / "b")]  # bit-identical, split words included

    train_adapter(config(w, tmp_path / "s1", max_steps=1))
    train_adapter(config(w, tmp_path / "s2a", stage=2, max_steps=4, init=str(tmp_path / "s1")))
    real = stop_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(config(w, tmp_path / "s2b", stage=2, max_steps=4, init=str(tmp_path / "s1")))
    monkeypatch.setattr(AdapterLoop, "train_step", real)
    train_adapter(config(w, tmp_path / "s2b", stage=2, max_steps=4, init=str(tmp_path / "s1"), resume="latest"))
    keys = ("lm", "align", "loss", "lr")
    assert [{k: m[k] for k in keys} for m in step_lines(tmp_path / "s2a")] == \
        [{k: m[k] for k in keys} for m in step_lines(tmp_path / "s2b")]


def torchrun(*args) -> None:
    two = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python",
                          str(BIN / "blitext"), *[str(a) for a in args]], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]


def assert_close_lines(one: Path, two: Path, keys: tuple[str, ...]) -> None:
    l1, l2 = step_lines(one), step_lines(two)
    assert [m["step"] for m in l1] == [m["step"] for m in l2] and l1
    for m1, m2 in zip(l1, l2):  # the split words are drawn for the global batch: the same on any layout
        for k in keys:
            assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-5), (m1["step"], k)


def test_two_ranks_equal_one_process(tmp_path, t5world):
    w = t5world
    (tmp_path / "p.json").write_text(json.dumps({"log_every": 1, "warmup_steps": 1}))
    train_pformer(tiny_config(w["captions"], tmp_path / "p1", w["llm"], w["bert"], max_steps=3, warmup_steps=1))
    torchrun("train-pformer", "--text", w["captions"], "--llm", w["llm"], "--text-encoder", w["bert"], "--batch-size",
             4, "--max-steps", 3, "--n-prompt", 4, "--heldout", 4, "--sample-every", 1000, "--device", "cpu",
             "--config", tmp_path / "p.json", "--out", tmp_path / "p2")
    assert_close_lines(tmp_path / "p1", tmp_path / "p2", ("lm", "contrast", "vocab", "loss"))

    train_adapter(config(w, tmp_path / "s1", max_steps=1))
    train_adapter(config(w, tmp_path / "one", stage=2, max_steps=3, init=str(tmp_path / "s1")))
    (tmp_path / "a.json").write_text(json.dumps({"embed_dim": 16}))
    torchrun("train-adapter", "--stage", 2, "--features", w["features"], "--prompts", w["prompts"], "--captions",
             w["captions"], "--text-encoder", w["bert"], "--llm", w["llm"], "--batch-size", 4, "--max-steps", 3,
             "--warmup-steps", 1, "--log-every", 1, "--device", "cpu", "--init", tmp_path / "s1",
             "--config", tmp_path / "a.json", "--out", tmp_path / "two")
    assert_close_lines(tmp_path / "one", tmp_path / "two", ("lm", "align", "loss"))


def test_prompt_caches_are_refused_across_families(tmp_path, t5world, llm_folders):
    w = t5world
    train_pformer(PFormerConfig(text=[str(w["captions"])], out=str(tmp_path / "opt-pformer"),
                                llm=str(llm_folders["opt"]), text_encoder=str(w["bert"]), batch_size=4, heldout=2,
                                n_prompt=4, max_steps=1, warmup_steps=1, sample_every=1000, device="cpu"))
    build_prompts(BuildPromptsConfig(pformer=str(tmp_path / "opt-pformer"), captions=[str(w["captions"])],
                                     out=str(tmp_path / "opt-prompts"), batch_size=4, shard_size=8, device="cpu"))
    assert "llm_family" not in PromptCache(tmp_path / "opt-prompts").producer  # causal producers as before
    with pytest.raises(BlitextError, match=r"were built for .*\(an encoder-decoder LLM; this run's is causal\)"):
        train_adapter(config(w, tmp_path / "r1", llm=str(llm_folders["opt"]), stage=2))  # T5 prompts, OPT run
    result = CliRunner().invoke(app, ["train-adapter", "--features", str(w["features"]), "--prompts",
                                      str(tmp_path / "opt-prompts"), "--text-encoder", str(w["bert"]), "--llm",
                                      str(w["llm"]), "--batch-size", "4", "--max-steps", "1", "--device", "cpu",
                                      "--out", str(tmp_path / "r2")])  # OPT prompts, T5 run (stage 1: config only)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    line = result.output.strip().splitlines()[-1]  # the error, one line, after the pair store's progress line
    assert str(tmp_path / "opt-prompts") in line and "(a causal LLM; this run's is encoder-decoder)" in line, line
    assert "build prompts with a P-Former trained for --llm" in line
