"""train-adapter on tiny real models over real caches: stage losses, exactness, refusals, DDP, generate."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from typer.testing import CliRunner

from blitext.adapter.image import AdapterConfig, AdapterLoop, train_adapter
from blitext.models.adapter_checkpoint import LoadedAdapter, load_adapter
from blitext.cli.main import app
from blitext.errors import BlitextError
from blitext.features.image import ExtractConfig, extract_features
from blitext.losses import itm_negatives
from blitext.models.loading import load_text_encoder
from blitext.models.qformer import QFormer, qformer_tokenizer, unilm_mask
from blitext.pformer.train import PFormerConfig, train_pformer
from blitext.pformer.prompts import BuildPromptsConfig, build_prompts
from blitext.training import read_metrics
from conftest import assert_tells_apart
from test_pformer_train import dropout_free_bert

BIN = Path(sys.executable).parent
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}
SHAPES = ("circle", "square")
N_PROMPT = 4


# ---------------------------------------------------------------- fixtures: real caches from tiny models

def write_images(root: Path, n: int = 16) -> Path:
    """n PNGs of a coloured shape, with 1-2 captions each, as a LAVIS caption JSON."""
    (root / "images").mkdir(parents=True)
    entries = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % 2], SHAPES[(i // 2) % 2]
        image = Image.new("RGB", (32, 32), "white")
        box = (4 + i % 5, 4, 26, 26 - i % 3)
        (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, fill=COLOURS[colour])
        image.save(root / "images" / f"{i}.png")
        captions = [f"a {colour} {shape}"] + ([f"the {shape} moves left"] if i % 3 == 0 else [])
        entries.append({"image": f"images/{i}.png", "image_id": f"img{i}", "caption": captions})
    path = root / "captions_train.json"
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, vision_folders, llm_folders, bert_folder) -> dict:
    """Images, their cached features (tiny ViT), a tiny P-Former for the tiny OPT, its prompt cache."""
    root = tmp_path_factory.mktemp("adapter")
    bert = dropout_free_bert(bert_folder, root / "bert")
    captions = write_images(root / "data")
    features = root / "features"
    extract_features(ExtractConfig(data=str(captions), out=str(features), vision_encoder=str(vision_folders["vit"]),
                                   batch_size=4, shard_size=8, num_workers=0, device="cpu"))
    train_pformer(PFormerConfig(text=[str(captions)], out=str(root / "pformer"), llm=str(llm_folders["opt"]),
                                text_encoder=str(bert), batch_size=4, heldout=2, n_prompt=N_PROMPT, max_steps=2,
                                warmup_steps=1, sample_every=1000, n_samples=1, device="cpu"))
    prompts = root / "prompts"
    build_prompts(BuildPromptsConfig(pformer=str(root / "pformer"), captions=[str(captions)], out=str(prompts),
                                     batch_size=4, shard_size=8, device="cpu"))
    return {"root": root, "bert": bert, "captions": captions, "features": features, "prompts": prompts,
            "llm": llm_folders["opt"], "vision": vision_folders["vit"]}


def config(world: dict, out: Path, **kw) -> AdapterConfig:
    values = dict(features=str(world["features"]), prompts=str(world["prompts"]), captions=[str(world["captions"])],
                  out=str(out), text_encoder=str(world["bert"]), llm=str(world["llm"]), batch_size=4, max_steps=4,
                  warmup_steps=1, log_every=1, save_every=2, device="cpu", embed_dim=16)
    return AdapterConfig(**{**values, **kw})


def step_lines(run: Path) -> list[dict]:
    return [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def stop_at_step(monkeypatch, stop: int):
    """Make AdapterLoop raise KeyboardInterrupt (as Ctrl-C) when it reaches step `stop`; returns the real step."""
    real = AdapterLoop.train_step

    def interrupted(self, step, steps, batch):
        if step == stop:
            raise KeyboardInterrupt
        return real(self, step, steps, batch)

    monkeypatch.setattr(AdapterLoop, "train_step", interrupted)
    return real


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


def test_qformer_starts_as_the_bert_it_came_from(world):
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


# ---------------------------------------------------------------- training runs

def test_stage1_writes_every_loss_and_a_whole_checkpoint(tmp_path, world):
    run = tmp_path / "s1"
    train_adapter(config(world, run))
    lines = step_lines(run)
    assert [m["step"] for m in lines] == [0, 1, 2, 3]
    for key in ("itc", "itm", "itg", "align", "loss", "data_wait", "pairs_per_s"):
        assert all(key in m for m in lines), key
    m = lines[0]
    assert m["loss"] == pytest.approx(m["itc"] + m["itm"] + m["itg"] + 10 * m["align"], rel=1e-5)  # w1 = 10
    adapter = load_adapter(run)
    assert adapter.model.n_prompt == N_PROMPT and adapter.tokenizer.bos_token == "[DEC]"
    assert "embeddings.word_embeddings.weight" in weights(run)  # a stage-1 checkpoint holds the text branch


def test_w_align_zero_equals_a_run_without_prompts(tmp_path, world):
    # the same queries as the prompts' slots (without prompts the default is the paper's 32)
    train_adapter(config(world, tmp_path / "zero", w_align=0.0))
    train_adapter(config(world, tmp_path / "none", w_align=0.0, prompts=None, n_prompt=N_PROMPT))
    assert_same_weights(weights(tmp_path / "zero"), weights(tmp_path / "none"))
    zero, none = step_lines(tmp_path / "zero"), step_lines(tmp_path / "none")
    assert [m["loss"] for m in zero] == [m["loss"] for m in none]
    assert all(m["align"] > 0 for m in zero)  # still measured, never trained on
    init = load_file(tmp_path / "zero" / "checkpoints" / "step-0000002" / "model.safetensors")["llm_proj.weight"]
    assert torch.equal(init, weights(tmp_path / "zero")["llm_proj.weight"])  # llm_proj untouched in stage 1
    # and in stage 2, from each stage-1 run
    train_adapter(config(world, tmp_path / "zero2", stage=2, w_align=0.0, init=str(tmp_path / "zero")))
    train_adapter(config(world, tmp_path / "none2", stage=2, w_align=0.0, prompts=None, n_prompt=N_PROMPT,
                         init=str(tmp_path / "none")))
    assert_same_weights(weights(tmp_path / "zero2"), weights(tmp_path / "none2"))


def test_centred_alignment_trains_on_its_own_loss_and_resumes_only_as_itself(tmp_path, world):
    train_adapter(config(world, tmp_path / "c", align_loss="centred", align_steps=2, max_steps=0))
    state = json.loads((tmp_path / "c" / "final" / "state.json").read_text())
    assert state["resume_config"]["align_loss"] == "centred"
    assert set(state["align_scales"]) == {"mean_square", "spread_square"} and state["align_scales"]["spread_square"] > 0
    centred = step_lines(tmp_path / "c")
    train_adapter(config(world, tmp_path / "m", align_steps=2, max_steps=0))
    mse = step_lines(tmp_path / "m")
    # each part over its size: an adaptor not yet aligned scores about 1 or more, whatever the prompts' scale
    assert centred[0]["align"] > 1 and centred[0]["align"] != pytest.approx(mse[0]["align"], rel=0.1)
    with pytest.raises(BlitextError, match="align_loss"):
        train_adapter(config(world, tmp_path / "c", align_steps=2, max_steps=0, resume="latest"))
    with pytest.raises(BlitextError, match="--align-loss 'cosine'"):
        config(world, tmp_path / "x", align_loss="cosine")


def test_resume_replays_exactly(tmp_path, world, monkeypatch):
    train_adapter(config(world, tmp_path / "a", max_steps=6))
    real = stop_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(config(world, tmp_path / "b", max_steps=6))
    monkeypatch.setattr(AdapterLoop, "train_step", real)
    with pytest.raises(BlitextError, match="--resume latest"):
        train_adapter(config(world, tmp_path / "b", max_steps=6))
    train_adapter(config(world, tmp_path / "b", max_steps=6, resume="latest"))
    a, b = step_lines(tmp_path / "a"), step_lines(tmp_path / "b")
    assert [m["step"] for m in b] == list(range(6))
    keys = ("itc", "itm", "itg", "align", "loss", "lr", "temp")
    assert [{k: m[k] for k in keys} for m in a] == [{k: m[k] for k in keys} for m in b]
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_alignment_phase_runs_first_and_resumes_exactly_across_its_end(tmp_path, world, monkeypatch):
    """--align-steps: L_align alone first (nothing else computed, the text branch untouched), then the
    stage's own losses with fresh moments; a run stopped after the boundary resumes to the same weights."""
    train_adapter(config(world, tmp_path / "a", align_steps=2, max_steps=4))
    lines = step_lines(tmp_path / "a")
    assert [set(m) >= {"itc", "itm", "itg"} for m in lines] == [False, False, True, True, True, True]
    assert all("align" in m for m in lines)
    real = stop_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(config(world, tmp_path / "b", align_steps=2, max_steps=4))
    monkeypatch.setattr(AdapterLoop, "train_step", real)
    train_adapter(config(world, tmp_path / "b", align_steps=2, max_steps=4, resume="latest"))
    assert [m["loss"] for m in step_lines(tmp_path / "b")] == [m["loss"] for m in lines]
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    # a stage 1 of the alignment phase alone, and the refusals
    train_adapter(config(world, tmp_path / "c", align_steps=3, max_steps=0))
    assert [set(m) & {"itc", "align"} for m in step_lines(tmp_path / "c")] == [{"align"}] * 3
    encoder = load_text_encoder(str(world["bert"]))
    torch.manual_seed(42)  # as train-adapter seeds the new parts
    init = QFormer.from_text_encoder(encoder.model, qformer_tokenizer(encoder.tokenizer), 32, N_PROMPT, 32,
                                     embed_dim=16).state_dict()
    aligned = weights(tmp_path / "c")
    for untouched in ("itm_head.weight", "text_proj.weight", "embeddings.word_embeddings.weight"):
        assert torch.equal(aligned[untouched], init[untouched]), untouched  # only queries and llm_proj learn
    assert not torch.equal(aligned["llm_proj.weight"], init["llm_proj.weight"])
    with pytest.raises(BlitextError, match="needs --w-align above 0"):
        config(world, tmp_path / "d", align_steps=3, w_align=0)
    with pytest.raises(BlitextError, match="nothing to train"):
        config(world, tmp_path / "d", max_steps=0)


def test_two_rank_ddp_matches_one_process(tmp_path, world):
    for stage, init in ((1, None), (2, tmp_path / "one1")):
        one = tmp_path / f"one{stage}"
        train_adapter(config(world, one, stage=stage, max_steps=3, init=init and str(init)))
        args = ["train-adapter", "--stage", str(stage), "--features", str(world["features"]), "--prompts",
                str(world["prompts"]), "--captions", str(world["captions"]), "--text-encoder", str(world["bert"]),
                "--llm", str(world["llm"]), "--batch-size", "4", "--max-steps", "3", "--warmup-steps", "1",
                "--log-every", "1", "--save-every", "2", "--device", "cpu", "--out", str(tmp_path / f"two{stage}")]
        (tmp_path / "cfg.json").write_text(json.dumps({"embed_dim": 16}))
        args += ["--config", str(tmp_path / "cfg.json")] + (["--init", str(tmp_path / "two1")] if init else [])
        two = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python",
                              str(BIN / "blitext"), *args], capture_output=True, text=True, timeout=300)
        assert two.returncode == 0, two.stderr[-3000:]
        l1, l2 = step_lines(one), step_lines(tmp_path / f"two{stage}")
        assert [m["step"] for m in l1] == [m["step"] for m in l2] == [0, 1, 2]
        for m1, m2 in zip(l1, l2):
            # ITC gathers both ranks' rows, ITM draws from the whole global batch with the same
            # seeded numbers, token-mean losses are weighted by each rank's share of tokens.
            for k in ("itc", "itm", "itg", "lm", "align", "loss"):
                if k in m1:
                    assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-5), (stage, m1["step"], k)
        w1, w2 = weights(one), weights(tmp_path / f"two{stage}")
        for k in w1:
            if k.endswith("key.bias"):
                # softmax ignores what a key bias adds to all of a query's scores: its gradient is zero
                # but for rounding, and AdamW turns that noise into +-lr steps of either sign
                continue
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_mismatched_caches_are_refused(tmp_path, world, llm_folders, vision_folders):
    with pytest.raises(BlitextError, match="were built for"):  # prompts made for the tiny OPT, run for Llama
        train_adapter(config(world, tmp_path / "llama", llm=str(llm_folders["llama"])))
    with pytest.raises(BlitextError, match="this run expects"):  # features of the ViT, run names CLIP
        train_adapter(config(world, tmp_path / "clip", vision_encoder=str(vision_folders["clip"])))
    with pytest.raises(BlitextError, match="--n-prompt 3 but the reference prompts have 4"):
        train_adapter(config(world, tmp_path / "q3", n_prompt=3))
    with pytest.raises(BlitextError, match="needs reference prompts"):
        config(world, tmp_path / "np", prompts=None)
    # stage 2 from a stage-1 run on other features
    other = tmp_path / "features-clip"
    extract_features(ExtractConfig(data=str(world["captions"]), out=str(other), vision_encoder=str(vision_folders["clip"]),
                                   batch_size=4, shard_size=8, num_workers=0, device="cpu"))
    train_adapter(config(world, tmp_path / "s1", max_steps=1))
    with pytest.raises(BlitextError, match="stage 2 must use stage 1's visual features"):
        train_adapter(config(world, tmp_path / "s2", stage=2, features=str(other), init=str(tmp_path / "s1")))
    with pytest.raises(BlitextError, match="was trained with features_producer"):  # resume on other features
        train_adapter(config(world, tmp_path / "s1", max_steps=2, features=str(other), resume="latest"))


def record_features(monkeypatch) -> list[torch.Tensor]:
    """The visual features each AdapterLoop step hands the Q-Former, in step order."""
    seen, real = [], AdapterLoop.losses

    def recording(self, phase, step, index, features, feature_mask, reference):
        seen.append(features.detach().float().clone())
        return real(self, phase, step, index, features, feature_mask, reference)

    monkeypatch.setattr(AdapterLoop, "losses", recording)
    return seen


def test_online_encoder_matches_the_cache(tmp_path, world, monkeypatch):
    """--online runs the same encoder and preprocessing in the loop: each step's features equal the
    cache's rows for the same images up to its fp16 rounding, and so do the losses."""
    seen = record_features(monkeypatch)
    train_adapter(config(world, tmp_path / "cached", max_steps=2))
    cached, seen[:] = list(seen), []
    train_adapter(config(world, tmp_path / "online", max_steps=2, online=True, features=None,
                         vision_encoder=str(world["vision"])))
    for a, b in zip(cached, seen, strict=True):
        assert_tells_apart(a[0], a[1], "two images' cached features")  # a misrouted image would show
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-3)
    for a, b in zip(step_lines(tmp_path / "cached"), step_lines(tmp_path / "online")):
        for k in ("itc", "itm", "itg", "align"):
            assert b[k] == pytest.approx(a[k], rel=2e-2), k


def test_each_image_is_aligned_to_its_own_captions_prompt(tmp_path, world):
    """L_align at step 0 equals the test's own: the initial Q-Former's prompts for the batch's images
    against the P-Former prompts of those very pairs' captions (not another caption's)."""
    from blitext.cache import FeatureCache
    from blitext.data.pairs import read_pairs
    from blitext.losses import alignment_loss
    from blitext.pformer.prompts import PromptCache
    from blitext.training import global_batch

    cfg = config(world, tmp_path / "a", align_steps=1, max_steps=0)
    train_adapter(cfg)
    logged = step_lines(tmp_path / "a")[0]["align"]
    cache = FeatureCache(world["features"])
    pairs = read_pairs([str(world["captions"])], None, lambda image_id: image_id in cache)
    index = global_batch(0, len(pairs), cfg.batch_size, cfg.seed)
    features, _ = cache.get_batch([pairs.image_ids[i] for i in index])
    reference = PromptCache(world["prompts"]).get_batch([pairs.keys[i] for i in index])
    encoder = load_text_encoder(str(world["bert"]))
    torch.manual_seed(cfg.seed)  # as train-adapter seeds the new parts
    model = QFormer.from_text_encoder(encoder.model, qformer_tokenizer(encoder.tokenizer), 32, N_PROMPT, 32,
                                      embed_dim=16)
    with torch.no_grad():
        prompts = model.prompts(features.float())
        own, shifted = alignment_loss(prompts, reference), alignment_loss(prompts, reference.roll(1, 0))
    # another caption's prompt would show: 10x the tolerance below (the initial prompts differ little
    # between images, so most of L_align is the distance between means, the same either way)
    assert abs(float(shifted) - float(own)) > 10 * 1e-4 * float(own)
    assert logged == pytest.approx(float(own), rel=1e-4)


def test_stage2_then_generate_and_check_prompts_from_the_cli(tmp_path, world, monkeypatch):
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
