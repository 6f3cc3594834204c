"""train-adapter --modality video on tiny real models over real variable-length HDF5 caches:
masks, slots, the paper's two-phase schedule, joint and LM-only runs, exact resume, refusals,
generate and eval caption from a video feature cache."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import blitext
from blitext.cache import CachePlan, FeatureCache, ShardWriter, finalize, pending_shards, start_or_resume
from blitext.cli.main import app
from blitext.errors import BlitextError
from blitext.evaluation.evaluate import EvalConfig, eval_caption
from blitext.models.adapter_checkpoint import load_adapter
from blitext.models.loading import load_text_encoder
from blitext.models.video_adapter import VideoAdapter, to_slots
from blitext.pformer.train import PFormerConfig, train_pformer
from blitext.pformer.prompts import BuildPromptsConfig, build_prompts
from blitext.training import read_metrics
from blitext.adapter.video import VideoAdapterConfig, VideoLoop, train_video_adapter
from conftest import assert_tells_apart, make_llm_folder
from test_pformer_train import dropout_free_bert

N_PROMPT = 4
D_IN = 12
PRODUCER = {"modality": "video", "encoder": "tiny-i3d", "fingerprint": "tiny-i3d@0000"}
COLOURS, SHAPES, MOTIONS = ("red", "blue"), ("circle", "square"), ("left", "right")


def write_video_cache(root: Path, ids: list[str], producer: dict = PRODUCER, seed: int = 0) -> Path:
    """A variable-length cache: video i has 2..9 segments (some above N_PROMPT, so pooled), its
    features a colour/shape code plus a time trend whose sign is the motion (learnable captions)."""
    rng = np.random.default_rng(seed)
    plan = CachePlan(root, "video-features", producer, ids, shard_size=8, variable_length=True)
    start_or_resume(plan)
    for s in pending_shards(plan):
        with ShardWriter(plan, s) as w:
            for i in plan.shard_range(s):
                t = 2 + i % 8
                row = rng.normal(0, 0.1, (t, D_IN))
                row[:, i % 2] += 1.0                                           # colour
                row[:, 2 + (i // 2) % 2] += 1.0                                # shape
                row[:, 4] += np.linspace(-1, 1, t) * (1 if (i // 4) % 2 else -1)  # motion
                w.add([ids[i]], [row])
    finalize(plan)
    return root


def write_captions(path: Path, n: int) -> Path:
    entries = [{"image": f"videos/v{i}.mp4", "image_id": f"v{i}",
                "caption": [f"a {COLOURS[i % 2]} {SHAPES[(i // 2) % 2]} moves {MOTIONS[(i // 4) % 2]}"]}
               for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries))
    return path


def responsive_llm(folder: Path) -> Path:
    """conftest's tiny OPT (std 0.2, so its loss moves with the prompts) from seed 0."""
    torch.manual_seed(0)
    return make_llm_folder("opt", folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory, bert_folder) -> dict:
    root = tmp_path_factory.mktemp("video")
    bert = dropout_free_bert(bert_folder, root / "bert")
    llm = responsive_llm(root / "llm")
    captions = write_captions(root / "data" / "captions_train.json", 16)
    features = write_video_cache(root / "features", [f"v{i}" for i in range(16)])
    pformer, prompts = root / "pformer", root / "prompts"  # a P-Former of 2 steps: its prompts are only targets here
    train_pformer(PFormerConfig(text=[str(captions)], out=str(pformer), llm=str(llm), text_encoder=str(bert),
                                batch_size=4, heldout=3, n_prompt=N_PROMPT, max_steps=2, warmup_steps=1,
                                sample_every=1000, device="cpu"))
    build_prompts(BuildPromptsConfig(pformer=str(pformer), captions=[str(captions)], out=str(prompts), batch_size=8,
                                     shard_size=16, device="cpu"))
    return {"root": root, "bert": bert, "captions": captions, "features": features, "prompts": prompts,
            "llm": llm}


def config(world: dict, out: Path, **kw) -> VideoAdapterConfig:
    values = dict(features=str(world["features"]), prompts=str(world["prompts"]), captions=[str(world["captions"])],
                  out=str(out), text_encoder=str(world["bert"]), llm=str(world["llm"]), batch_size=4, max_steps=3,
                  align_steps=3, warmup_steps=1, lr=1e-3, log_every=1, save_every=2, device="cpu")
    return VideoAdapterConfig(**{**values, **kw})


def step_lines(run: Path) -> list[dict]:
    return [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


# ---------------------------------------------------------------- the model

def test_padded_segments_change_nothing_in_real_outputs(bert_folder):
    torch.manual_seed(0)
    model = VideoAdapter.from_text_encoder(load_text_encoder(str(bert_folder)).model, D_IN, 6, 32).eval()
    feats = torch.randn(3, 9, D_IN)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, :3], mask[1, :6], mask[2, :] = True, True, True  # 3 and 6 real segments, and 9 > 6 slots (pooled)
    with torch.no_grad():
        batched = model.prompts(feats, mask)  # (3, 6, 32)
        alone = [model.prompts(feats[i:i + 1, :n]) for i, n in enumerate((3, 6, 9))]
        # the Transformer itself: a row's real segments give the same outputs with any amount of padding
        short = model.segment_output(feats[:1, :3])
        padded = model.segment_output(feats[:1], mask[:1])[:, :3]
    assert batched.shape == (3, 6, 32) and model.n_prompt == 6
    for i in range(3):
        torch.testing.assert_close(batched[i:i + 1], alone[i], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded, short, rtol=1e-5, atol=1e-5)
    slots, slot_mask = to_slots(feats, mask, 6)
    assert slot_mask.sum(1).tolist() == [3, 6, 6]
    torch.testing.assert_close(slots[2, 0], feats[2, :2].mean(0))  # 9 segments into 6 slots: bins of 2, 1, 2, ...
    torch.testing.assert_close(slots[0, :3], feats[0, :3])
    assert not slots[0, 3:].any()


def test_starts_as_the_bert_it_came_from(bert_folder):
    encoder = load_text_encoder(str(bert_folder))
    model = VideoAdapter.from_text_encoder(encoder.model, D_IN, N_PROMPT, 32).eval()
    embeds = torch.randn(2, 5, 32)
    torch.testing.assert_close(model.transformer(inputs_embeds=embeds).last_hidden_state,
                               encoder.model.eval()(inputs_embeds=embeds).last_hidden_state)
    rebuilt = VideoAdapter.from_description(json.loads(json.dumps(model.describe())))
    rebuilt.load_state_dict(model.state_dict())  # strict: every tensor has its place
    feats, mask = torch.randn(2, 7, D_IN), torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    with torch.no_grad():
        ours = model.prompts(feats, mask)
        assert rebuilt.n_prompt == model.n_prompt
        torch.testing.assert_close(rebuilt.eval().prompts(feats, mask), ours, rtol=0, atol=0)
    assert_tells_apart(ours[0], ours[1], "the video adaptor's prompts for two clips")


# ---------------------------------------------------------------- training runs

def test_paper_schedule_losses_go_down_then_generate_and_eval(tmp_path, world):
    run = tmp_path / "seq"
    train_video_adapter(config(world, run, align_steps=12, max_steps=30, batch_size=8, lr=3e-3, save_every=100))
    lines = step_lines(run)
    assert [m["phase"] for m in lines] == ["align"] * 12 + ["lm"] * 30
    align, lm = lines[:12], lines[12:]
    assert all("lm" not in m and m["loss"] == pytest.approx(100 * m["align"], rel=1e-5) for m in align)
    assert all(m["loss"] == pytest.approx(m["lm"], rel=1e-6) and m["align"] > 0 for m in lm)  # measured only
    first, last = lambda xs, k: np.mean([m[k] for m in xs[:3]]), lambda xs, k: np.mean([m[k] for m in xs[-3:]])
    assert last(align, "align") < 0.7 * first(align, "align")
    assert last(lm, "lm") < 0.95 * first(lm, "lm")  # a random LLM: only part of its loss can be learned
    assert lm[0]["lr"] < lm[1]["lr"]  # the LM phase warms up again

    adapter = load_adapter(run)
    assert isinstance(adapter.model, VideoAdapter) and adapter.stage == 2 and adapter.tokenizer is None
    feats, mask = FeatureCache(world["features"]).get_batch(["v0", "v7"])  # 2 and 9 segments
    with torch.no_grad():
        assert adapter.model.prompts(feats.float(), mask).shape == (2, N_PROMPT, 32)

    runner = CliRunner()
    out = tmp_path / "gen.json"
    g = runner.invoke(app, ["generate", "--adapter", str(run), "--features", str(world["features"]), "--ids", "v0",
                            "--ids", "v7", "--prompt", "", "--max-new-tokens", "4", "--min-new-tokens", "1",
                            "--num-beams", "2", "--device", "cpu", "--out", str(out)])
    assert g.exit_code == 0, g.output
    generated = json.loads(out.read_text())
    assert [r["image"] for r in generated] == ["v0", "v7"]
    model = blitext.load(run, device="cpu")  # the Python API: one (T, D) tensor per clip, unpadded
    clips = [feats[0][mask[0]], feats[1][mask[1]]]
    assert model.caption(clips, prompt="", max_new_tokens=4, min_new_tokens=1, num_beams=2) == \
        [r["text"] for r in generated]
    with pytest.raises(BlitextError, match="one \\(T, D\\) tensor per clip"):
        model.caption(world["root"] / "x.png")
    result = eval_caption(EvalConfig(adapter=str(run), features=str(world["features"]), data=str(world["captions"]),
                                     limit=6, batch_size=4, device="cpu", prompt="", num_beams=2, max_new_tokens=4,
                                     min_new_tokens=1, tokenizer="python", meteor="off", spice="off"))
    assert result["counts"] == {"images": 6} and "CIDEr" in result["metrics"]


def test_lm_only_baseline_and_joint_schedule(tmp_path, world):
    train_video_adapter(config(world, tmp_path / "base", w_align=0.0))
    base = step_lines(tmp_path / "base")
    assert [m["phase"] for m in base] == ["lm"] * 3  # no alignment phase at weight 0
    assert all(m["loss"] == pytest.approx(m["lm"], rel=1e-6) and m["align"] > 0 for m in base)
    train_video_adapter(config(world, tmp_path / "none", w_align=0.0, prompts=None, n_prompt=N_PROMPT))
    assert [m["loss"] for m in step_lines(tmp_path / "none")] == [m["loss"] for m in base]  # prompts only measured
    w1, w2 = weights(tmp_path / "base"), weights(tmp_path / "none")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)

    train_video_adapter(config(world, tmp_path / "joint", schedule="joint", w_align=10.0))
    joint = step_lines(tmp_path / "joint")
    assert [m["phase"] for m in joint] == ["joint"] * 3
    assert all(m["loss"] == pytest.approx(m["lm"] + 10 * m["align"], rel=1e-5) for m in joint)


def test_resume_across_the_phase_boundary_replays_exactly(tmp_path, world, monkeypatch):
    train_video_adapter(config(world, tmp_path / "a", save_every=3))
    real = VideoLoop.train_step

    def interrupted(self, step, steps, batch):
        if step == 4:  # the last checkpoint is step 3: the alignment phase's end, AdamW's moments not yet reset
            raise KeyboardInterrupt
        return real(self, step, steps, batch)

    monkeypatch.setattr(VideoLoop, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_video_adapter(config(world, tmp_path / "b", save_every=3))
    monkeypatch.setattr(VideoLoop, "train_step", real)
    with pytest.raises(BlitextError, match="--resume latest"):
        train_video_adapter(config(world, tmp_path / "b", save_every=3))
    train_video_adapter(config(world, tmp_path / "b", save_every=3, resume="latest"))
    a, b = step_lines(tmp_path / "a"), step_lines(tmp_path / "b")
    keys = ("phase", "align", "lm", "loss", "lr")
    assert [m["step"] for m in b] == list(range(6))
    assert [{k: m.get(k) for k in keys} for m in a] == [{k: m.get(k) for k in keys} for m in b]
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_mismatched_caches_are_refused(tmp_path, world, llm_folders):
    with pytest.raises(BlitextError, match="were built for"):  # prompts made for the OPT, run for Llama
        train_video_adapter(config(world, tmp_path / "llama", llm=str(llm_folders["llama"])))
    with pytest.raises(BlitextError, match="--n-prompt 3 but the reference prompts have 4"):
        train_video_adapter(config(world, tmp_path / "q3", n_prompt=3))
    image = write_video_cache(tmp_path / "image-features", [f"v{i}" for i in range(16)],
                              {"encoder": "vit", "fingerprint": "vit@1"})
    with pytest.raises(BlitextError, match="holds image features"):
        train_video_adapter(config(world, tmp_path / "img", features=str(image)))
    other = write_video_cache(tmp_path / "other", [f"v{i}" for i in range(16)], {**PRODUCER, "fingerprint": "x@1"})
    train_video_adapter(config(world, tmp_path / "r", align_steps=2, max_steps=1))
    with pytest.raises(BlitextError, match="was trained with features_producer"):  # resume on other features
        train_video_adapter(config(world, tmp_path / "r", align_steps=2, max_steps=2, features=str(other),
                                   resume="latest"))
    runner = CliRunner()
    refused = runner.invoke(app, ["train-adapter", "--modality", "video", "--stage", "2", "--features",
                                  str(world["features"]), "--w-align", "0", "--device", "cpu"])
    assert refused.exit_code == 2 and "unknown config key(s) ['stage']" in refused.output
    refused = runner.invoke(app, ["train-adapter", "--schedule", "joint", "--features", str(world["features"])])
    assert refused.exit_code == 2 and "need --modality video" in refused.output


def test_alignment_only_run_is_refused_for_generation(tmp_path, world):
    run = tmp_path / "align-only"
    train_video_adapter(config(world, run, max_steps=None, epochs=0, align_steps=2))
    assert [m["phase"] for m in step_lines(run)] == ["align"] * 2 and load_adapter(run).stage == 1
    g = CliRunner().invoke(app, ["generate", "--adapter", str(run), "--features", str(world["features"]),
                                 "--ids", "v0", "--device", "cpu"])
    assert g.exit_code == 2 and "only the alignment phase" in g.output and "--epochs above 0" in g.output


def test_two_rank_ddp_matches_one_process(tmp_path, world):
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    train_video_adapter(config(world, tmp_path / "one", align_steps=2, max_steps=2))
    args = ["train-adapter", "--modality", "video", "--features", str(world["features"]), "--prompts",
            str(world["prompts"]), "--captions", str(world["captions"]), "--text-encoder", str(world["bert"]),
            "--llm", str(world["llm"]), "--batch-size", "4", "--align-steps", "2", "--max-steps", "2",
            "--warmup-steps", "1", "--lr", "1e-3", "--log-every", "1", "--device", "cpu", "--out", str(tmp_path / "two")]
    two = subprocess.run([str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python",
                          str(bin_dir / "blitext"), *args], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = step_lines(tmp_path / "one"), step_lines(tmp_path / "two")
    assert [m["phase"] for m in l2] == ["align", "align", "lm", "lm"]
    for m1, m2 in zip(l1, l2):  # token-mean LM losses weighted by each rank's share of the tokens
        for k in ("align", "lm", "loss"):
            if k in m1:
                assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-5), (m1["step"], k)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in (k for k in w1 if not k.endswith("key.bias")):  # softmax ignores a key bias: its gradient is rounding noise that AdamW turns into full steps
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_video_demo_smoke_runs_every_phase_and_reuses_them(session_cache, monkeypatch):
    monkeypatch.setenv("BLITEXT_CACHE", str(session_cache))  # the bundled LLM is converted once per session
    result = CliRunner().invoke(app, ["demo", "--video", "--smoke"])
    assert result.exit_code == 0, result.output[-3000:]
    work = next((session_cache / "runs" / "demo-video").iterdir())
    results = json.loads((work / "results.json").read_text())
    assert set(results) == {"itg-only", "pformer"} and all("CIDEr" in r for r in results.values())
    assert all(0 <= r["direction_accuracy"] <= 1 for r in results.values())
    assert [m["phase"] for m in step_lines(work / "pformer")] == ["align"] * 3 + ["lm"] * 3
    assert [m["phase"] for m in step_lines(work / "itg-only")] == ["lm"] * 3
    assert (work / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = CliRunner().invoke(app, ["demo", "--video", "--smoke"])
    assert again.exit_code == 0 and again.output.count("reusing") >= 3, again.output[-3000:]


def test_attribute_accuracy_reads_the_first_colour_shape_and_direction_word(tmp_path):
    from blitext.recipes.demo_video import attribute_accuracy

    truth = [{"image_id": "a", "color": "red", "shape": "circle", "direction": "left", "caption": ["a red circle moves left"]},
             {"image_id": "b", "color": "blue", "shape": "square", "direction": "up", "caption": ["a blue square moves up"]}]
    (tmp_path / "captions_test.json").write_text(json.dumps(truth))
    out = tmp_path / "run" / "eval" / "caption-moving-shapes"
    out.mkdir(parents=True)
    (out / "predictions.json").write_text(json.dumps([
        {"image_id": "a", "caption": "A red square moves left."},     # colour, direction right; shape wrong
        {"image_id": "b", "caption": "a red blue circle moves up"}]))  # first colour word is the wrong one
    acc = attribute_accuracy(tmp_path / "run", tmp_path)
    assert acc == {"color_accuracy": 0.5, "shape_accuracy": 0.0, "direction_accuracy": 1.0}


def test_accumulated_lm_phase_equals_the_whole_batch(tmp_path, world):
    runs = {}
    for n in (1, 2):
        train_video_adapter(config(world, tmp_path / f"a{n}", align_steps=2, max_steps=3, batch_size=8,
                                   accum_steps=n, save_every=100))
        runs[n] = (step_lines(tmp_path / f"a{n}"), weights(tmp_path / f"a{n}"))
    (one, w1), (two, w2) = runs[1], runs[2]
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], rel=1e-5)
    assert all(torch.allclose(w2[k], w1[k], rtol=1e-5, atol=1e-6) for k in w1 if not k.endswith("key.bias"))
