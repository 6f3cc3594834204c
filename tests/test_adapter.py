"""train-adapter on tiny real models over real caches: stage losses, exactness, resume, refusals, DDP,
--online features. The adaptor's pieces and generation: test_adapter_generate.py; the world both
train in: adapter_world.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blitext.adapter.image import AdapterLoop, train_adapter
from blitext.models.adapter_checkpoint import load_adapter
from blitext.errors import BlitextError
from blitext.features.image import ExtractConfig, extract_features
from blitext.models.loading import load_text_encoder
from blitext.models.qformer import QFormer, qformer_tokenizer
from adapter_world import N_PROMPT, config, step_lines, stop_at_step, weights, world  # noqa: F401
from conftest import assert_tells_apart

BIN = Path(sys.executable).parent


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]



# ---------------------------------------------------------------- training runs

def test_stage1_writes_every_loss_and_a_whole_checkpoint(tmp_path, world):  # noqa: F811
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


def test_w_align_zero_equals_a_run_without_prompts(tmp_path, world):  # noqa: F811
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


def test_centred_alignment_trains_on_its_own_loss_and_resumes_only_as_itself(tmp_path, world):  # noqa: F811
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


def test_resume_replays_exactly(tmp_path, world, monkeypatch):  # noqa: F811
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


def test_alignment_phase_runs_first_and_resumes_exactly_across_its_end(tmp_path, world, monkeypatch):  # noqa: F811
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


def test_alignment_phase_has_its_own_rate_and_clip(tmp_path, world, monkeypatch):  # noqa: F811
    """--align-lr / --align-max-grad-norm reach only the L_align-alone steps; the stage's own steps keep --lr
    and --max-grad-norm (the recipe clips alignment but leaves BLIP-2's stage 1 unclipped)."""
    import blitext.adapter.image as image
    rates, clips = [], []
    monkeypatch.setattr(image, "set_lr", lambda optimizer, lr, real=image.set_lr: (rates.append(lr), real(optimizer, lr))[1])
    real_accumulated = AdapterLoop.accumulated
    monkeypatch.setattr(AdapterLoop, "accumulated", lambda self, *a: (clips.append(a[-1]), real_accumulated(self, *a))[1])
    train_adapter(config(world, tmp_path / "a", align_steps=2, max_steps=2, lr=1e-4, max_grad_norm=None,
                         align_lr=3e-3, align_max_grad_norm=0.5))
    assert rates[1] == pytest.approx(3e-3) and rates[3] == pytest.approx(1e-4)  # each phase's peak after warm-up
    assert clips == [0.5, 0.5, None, None]


def test_two_rank_ddp_matches_one_process(tmp_path, world):  # noqa: F811
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


def test_mismatched_caches_are_refused(tmp_path, world, llm_folders, vision_folders):  # noqa: F811
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


def test_online_encoder_matches_the_cache(tmp_path, world, monkeypatch):  # noqa: F811
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


def test_each_image_is_aligned_to_its_own_captions_prompt(tmp_path, world):  # noqa: F811
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

