"""The bundled real models on the embedded easy-VQA data: adaptor losses go down; `demo --smoke` runs.

Slow (minutes on 2 cores): the bundled SmolLM2, MiniLM and EfficientNet-Lite0, real images.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from blitext.adapter.image import AdapterConfig, train_adapter
from blitext.cache import FeatureCache
from blitext.cli.main import app
from blitext.data.prepare import prepare_dataset
from blitext.recipes.recipe import Recipe
from blitext.features.image import ExtractConfig, extract_features
from blitext.models.adapter_checkpoint import load_adapter
from blitext.models.loading import load_llm
from blitext.pformer.train import PFormerConfig, train_pformer
from blitext.pformer.prompts import BuildPromptsConfig, build_prompts
from blitext.training import read_metrics

pytestmark = pytest.mark.slow


def losses(run: Path, key: str) -> list[float]:
    return [m[key] for m in read_metrics(run / "metrics.jsonl") if key in m]


def first_vs_last(values: list[float], n: int = 5) -> tuple[float, float]:
    return statistics.mean(values[:n]), statistics.mean(values[-n:])


def test_adapter_losses_go_down_on_real_cached_features(session_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("BLITEXT_CACHE", str(session_cache))  # the bundled LLM is converted once per session
    data = prepare_dataset("easy-vqa", out_root=tmp_path / "data", limit=64)
    features = tmp_path / "features"
    extract_features(ExtractConfig(data=str(data), out=str(features)))
    train_pformer(PFormerConfig(text=[str(data / "captions_train.json")], out=str(tmp_path / "pformer"), n_prompt=4,
                                batch_size=8, max_steps=3, warmup_steps=1, heldout=4, sample_every=1000))
    prompts = tmp_path / "prompts"
    build_prompts(BuildPromptsConfig(pformer=str(tmp_path / "pformer"), captions=[str(data / "captions_train.json")],
                                     out=str(prompts)))
    common = dict(features=str(features), prompts=str(prompts), log_every=1, save_every=1000)
    # the demo's rates: stage 1 tolerates 1e-3, stage 2 diverges above ~5e-5 at small batches
    train_adapter(AdapterConfig(stage=1, out=str(tmp_path / "s1"), max_steps=24, warmup_steps=2, batch_size=16, lr=1e-3,
                                **common))
    for key in ("itc", "itm", "itg", "align"):
        first, last = first_vs_last(losses(tmp_path / "s1", key))
        assert last < first, (key, first, last)
    # Stage 2 at the demo's settings (its dropout, rate and clipping)
    demo = Recipe()
    train_adapter(AdapterConfig(stage=2, out=str(tmp_path / "s2"), init=str(tmp_path / "s1"), max_steps=40,
                                warmup_steps=2, batch_size=8, lr=demo.stage2_lr, dropout=demo.dropout,
                                max_grad_norm=demo.stage2_max_grad_norm, **common))
    first, last = first_vs_last(losses(tmp_path / "s2", "lm"))
    assert last < first - 0.5, (first, last)
    assert all(math.isfinite(v) for v in losses(tmp_path / "s2", "align"))


def test_a_trained_adaptor_captions_its_training_images_in_eval_mode(session_cache, monkeypatch, tmp_path):
    """A small overfit case at the demo's recipe, run as users run it: the adaptor loaded as
    `generate` loads it (eval mode) has the loss it trained to on its training pairs, and greedy
    `blitext generate` writes each training image's caption. With MiniLM's dropout of 0.1, the demo's
    trained adaptors had an eval-mode loss 10 times their train-mode loss and captions that derailed."""
    monkeypatch.setenv("BLITEXT_CACHE", str(session_cache))
    data = prepare_dataset("easy-vqa", out_root=tmp_path / "data", limit=64)
    features = tmp_path / "features"
    extract_features(ExtractConfig(data=str(data), out=str(features)))
    entries = json.loads((data / "captions_train.json").read_text())[:32]
    captions = data / "captions_overfit.json"
    captions.write_text(json.dumps(entries))
    demo, run = Recipe(), tmp_path / "s2"
    train_adapter(AdapterConfig(stage=2, w_align=0, features=str(features), captions=[str(captions)], out=str(run),
                                n_prompt=demo.n_prompt, num_layers=demo.num_layers, dropout=demo.dropout,
                                cross_attention_frequency=demo.cross_attention_frequency, batch_size=demo.batch_size,
                                max_steps=150, warmup_steps=15, lr=demo.stage2_lr,
                                max_grad_norm=demo.stage2_max_grad_norm,
                                log_every=1, save_every=1000))

    adapter = load_adapter(run)
    assert not adapter.model.training  # as generate and eval run it
    llm = load_llm(adapter.llm_name)
    texts = [e["caption"][0] if isinstance(e["caption"], list) else e["caption"] for e in entries]
    tgt = llm.lm_batch(texts, "\n", 10**6)
    rows = FeatureCache(features).get_batch([e["image_id"] for e in entries])[0].float()
    with torch.no_grad():
        eval_loss = float(llm.lm_loss(adapter.model.prompts(rows), tgt))
        # each caption after another image's prompts: an adaptor that ignored the image would not notice
        shuffled_loss = float(llm.lm_loss(adapter.model.prompts(rows.roll(1, 0)), tgt))
        adapter.model.train()
        train_loss = float(llm.lm_loss(adapter.model.prompts(rows), tgt))
        adapter.model.eval()
    assert eval_loss < 0.1 and abs(eval_loss - train_loss) < 0.02, (eval_loss, train_loss, losses(run, "lm")[-3:])
    assert shuffled_loss > eval_loss + 0.5, (shuffled_loss, eval_loss)

    out = tmp_path / "generated.json"
    g = CliRunner().invoke(app, ["generate", "--adapter", str(run), "--images", str(captions), "--prompt", "",
                                 "--num-beams", "1", "--min-new-tokens", "1", "--max-new-tokens", "8",
                                 "--out", str(out)])
    assert g.exit_code == 0, g.output[-2000:]
    written = [r["text"] for r in json.loads(out.read_text())]
    assert written == texts


def test_demo_smoke_runs_every_phase(session_cache, monkeypatch):
    monkeypatch.setenv("BLITEXT_CACHE", str(session_cache))
    result = CliRunner().invoke(app, ["demo", "--smoke"])
    assert result.exit_code == 0, result.output[-3000:]
    work = next(p for p in (session_cache / "runs" / "demo").iterdir() if not p.is_symlink())
    assert (work.parent / "latest").resolve() == work and os.readlink(work.parent / "latest") == work.name
    results = json.loads((work / "results.json").read_text())
    assert set(results["evaluations"]) == set(results["curves"]) == {"baseline", "pformer"}
    for name, variant in results["evaluations"].items():
        assert "CIDEr" in variant["caption-easy-vqa"] and "METEOR" in variant["caption-easy-vqa"]
        steps = [p["step"] for p in results["curves"][name][0]]
        assert steps == [0, 2, 4]  # after stage 1, the snapshot, the end
        assert results["costs"][name]["llm_forward_pairs"] == 4 * 4  # stage 2's steps x batch: stage 1 runs no LLM
    assert results["curves"]["baseline"][0][0]["untrained_llm_proj"]  # BLIP-2's stage 1 never trains llm_proj
    assert "untrained_llm_proj" not in results["curves"]["pformer"][0][0]  # L_align did: the LLM read it
    assert 0 <= results["ceiling"]["exact_match"] <= 1 and len(results["verdicts"]) == 4
    assert results["kernels"] == f"CPU {torch.backends.cpu.get_cpu_capability()}"  # what the digits depend on
    # make demo ends with the page to open, on one line whatever the terminal's width
    assert result.output.strip().splitlines()[-1] == f"report (open in a browser): {work / 'report.html'}", \
        result.output[-2000:]
    page = (work / "report.html").read_text()
    assert all(line.split(":")[0] in page for line in results["verdicts"]) and "budget curve" in page
    for png in ("stage1-curves.png", "stage2-curves.png", "budget-curve.png"):
        assert (work / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run reuses every finished phase
    again = CliRunner().invoke(app, ["demo", "--smoke"])
    assert again.exit_code == 0 and again.output.count("reusing") >= 4, again.output[-2000:]
