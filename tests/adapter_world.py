"""The tiny world that the adaptor tests share, and the runs trained in it.

`world`: images, their cached features (tiny ViT), a tiny P-Former for the tiny OPT and its
prompt cache. `runs`: stage-1 and stage-2 adaptors trained on it (and a stage 1 without L_align),
which the eval, score and API tests evaluate. Both are module-scoped: each test module that
imports them builds its own.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from blitext.adapter.image import AdapterConfig, AdapterLoop, train_adapter
from blitext.evaluation.evaluate import EvalConfig
from blitext.features.image import ExtractConfig, extract_features
from blitext.pformer.prompts import BuildPromptsConfig, build_prompts
from blitext.pformer.train import PFormerConfig, train_pformer
from blitext.training import read_metrics
from test_pformer_train import dropout_free_bert

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}
SHAPES = ("circle", "square")
N_PROMPT = 4
FAST = dict(num_beams=2, max_new_tokens=4, min_new_tokens=1, batch_size=4, device="cpu")  # tiny decoding
N_IMAGES = 6  # images 0..5 have 8 captions: at most 10 candidates each way


# ---------------------------------------------------------------- the world: real caches from tiny models

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



def stop_at_step(monkeypatch, stop: int):
    """Make AdapterLoop raise KeyboardInterrupt (as Ctrl-C) when it reaches step `stop`; returns the real step."""
    real = AdapterLoop.train_step

    def interrupted(self, step, steps, batch):
        if step == stop:
            raise KeyboardInterrupt
        return real(self, step, steps, batch)

    monkeypatch.setattr(AdapterLoop, "train_step", interrupted)
    return real


# ---------------------------------------------------------------- runs in it, and eval's settings for them

@pytest.fixture(scope="module")
def runs(world, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval-runs")
    train_adapter(config(world, root / "s1", max_steps=2))
    train_adapter(config(world, root / "s2", stage=2, max_steps=2, init=str(root / "s1")))
    train_adapter(config(world, root / "s1-plain", max_steps=1, w_align=0.0))  # llm_proj never met the LLM
    return {"s1": root / "s1", "s2": root / "s2", "s1_plain": root / "s1-plain"}


def common(world, runs, **kw) -> EvalConfig:
    values = dict(adapter=str(runs["s2"]), features=str(world["features"]), data=str(world["captions"]), **FAST)
    return EvalConfig(**{**values, **kw})


def read(path: Path):
    return json.loads(path.read_text())
