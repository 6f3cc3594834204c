"""Issue 22 (7d): every trainer counts the captions it cut to max_text_len tokens and the caption
rows that had no caption at all, in its state.json and its end-of-run line, on tiny real models.

Each run covers its pairs exactly once (pairs a multiple of the batch, one epoch of steps), so the
one long caption is cut exactly once, by each tokenizer that reads it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import blitext.loop
from blitext.adapter.image import AdapterConfig, train_adapter
from blitext.adapter.video import VideoAdapterConfig, train_video_adapter
from blitext.features.image import ExtractConfig, extract_features
from blitext.pformer.train import PFormerConfig, train_pformer
from adapter_world import write_images
from test_pformer_train import WORDS
from test_video_adapter import write_video_cache

LONG = " ".join(["a red circle"] * 1540)  # 20,019 characters, as the issue's: far past 32 tokens in any tokenizer


def add_long_and_captionless(path: Path, long_id: str, image: str, bare_id: str, bare_image: str) -> Path:
    """The caption file plus a row with a very long caption and a row with no "caption" key."""
    entries = json.loads(path.read_text())
    entries += [{"image": image, "image_id": long_id, "caption": LONG}, {"image": bare_image, "image_id": bare_id}]
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture
def said(monkeypatch) -> list[str]:
    """The lines the runs print at their end."""
    lines: list[str] = []
    monkeypatch.setattr(blitext.loop, "say", lines.append)
    return lines


def final_state(run: Path) -> dict:
    return json.loads((run / "final" / "state.json").read_text())


def assert_counted(run: Path, said: list[str], cut: dict[str, int]) -> None:
    state = final_state(run)
    assert state["truncated"] == cut and state["rows_without_caption"] == 1, state
    line = next(s for s in said if s.startswith("captions cut to 32 tokens"))
    assert all(f"{name} {n}" in line for name, n in cut.items()) and "rows without a caption: 1" in line, line


@pytest.fixture(scope="module")
def image_world(tmp_path_factory, vision_folders) -> dict:
    """8 images with 11 captions, one more very long one (12 pairs) and a row without a caption, cached."""
    root = tmp_path_factory.mktemp("counts")
    captions = add_long_and_captionless(write_images(root / "data", n=8), "img0", "images/0.png", "img1", "images/1.png")
    features = root / "features"
    extract_features(ExtractConfig(data=str(captions), out=str(features), vision_encoder=str(vision_folders["vit"]),
                                   batch_size=4, shard_size=8, num_workers=0, device="cpu"))
    return {"captions": captions, "features": features}


@pytest.mark.parametrize("stage, cut", [(1, {"qformer": 1}), (2, {"target": 1})])
def test_image_adapter_counts_cut_and_captionless(tmp_path, image_world, llm_folders, bert_folder, said, stage, cut):
    train_adapter(AdapterConfig(stage=stage, features=str(image_world["features"]), captions=[str(image_world["captions"])],
                                out=str(tmp_path / "run"), text_encoder=str(bert_folder), llm=str(llm_folders["opt"]),
                                w_align=0.0, n_prompt=4, batch_size=4, max_steps=3, warmup_steps=1, device="cpu",
                                embed_dim=16))
    assert_counted(tmp_path / "run", said, cut)


def test_video_adapter_counts_cut_and_captionless(tmp_path, llm_folders, bert_folder, said):
    ids = [f"v{i}" for i in range(12)]
    entries = [{"image": f"videos/{i}.mp4", "image_id": i, "caption": "a red circle moves left"} for i in ids[1:]]
    (tmp_path / "captions.json").write_text(json.dumps(entries))
    captions = add_long_and_captionless(tmp_path / "captions.json", "v0", "videos/v0.mp4", "v1", "videos/v1.mp4")
    features = write_video_cache(tmp_path / "features", ids)
    train_video_adapter(VideoAdapterConfig(features=str(features), captions=[str(captions)], out=str(tmp_path / "run"),
                                           text_encoder=str(bert_folder), llm=str(llm_folders["opt"]), w_align=0.0,
                                           n_prompt=4, batch_size=4, max_steps=3, warmup_steps=1, device="cpu"))
    assert_counted(tmp_path / "run", said, {"target": 1})


def test_pformer_counts_cut_and_captionless(tmp_path, llm_folders, bert_folder, said):
    # 11 sentences, 3 held out: 2 steps of 4 read each training one once, the end's samples each held-out one
    entries = [{"image": f"{i}.png", "caption": f"{WORDS[i]} {WORDS[i + 1]}"} for i in range(10)]
    (tmp_path / "captions.json").write_text(json.dumps(entries))
    captions = add_long_and_captionless(tmp_path / "captions.json", "long", "long.png", "bare", "bare.png")
    train_pformer(PFormerConfig(text=[str(captions)], out=str(tmp_path / "run"), llm=str(llm_folders["opt"]),
                                text_encoder=str(bert_folder), batch_size=4, heldout=3, n_prompt=4, max_steps=2,
                                warmup_steps=1, sample_every=1000, n_samples=1, device="cpu"))
    assert_counted(tmp_path / "run", said, {"encoder": 1, "target": 1})
