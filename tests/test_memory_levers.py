"""The memory levers every trainer takes: --grad-checkpointing (the frozen LLM's activations
recomputed in backward: the same numbers) and --precision (bf16 autocast on CPU too; fp16 needs
a GPU); and the trainer skeleton they share."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from blitext.adapter.image import train_adapter
from blitext.cli.main import app
from blitext.errors import BlitextError
from blitext.loop import Precision
from blitext.pformer.train import train_pformer
from blitext.training import read_metrics
from test_adapter import config, world  # noqa: F401
from test_pformer_train import tiny_config, write_sentences


def lines(run):
    return [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]


def test_grad_checkpointing_changes_no_number_of_stage2(tmp_path, world):  # noqa: F811
    train_adapter(config(world, tmp_path / "s1", max_steps=1))
    for name, on in (("plain", False), ("ckpt", True)):
        train_adapter(config(world, tmp_path / name, stage=2, max_steps=3, init=str(tmp_path / "s1"),
                             grad_checkpointing=on))
    plain, ckpt = lines(tmp_path / "plain"), lines(tmp_path / "ckpt")
    assert [m["lm"] for m in plain] == pytest.approx([m["lm"] for m in ckpt], rel=1e-6)
    a, b = load_file(tmp_path / "plain" / "final" / "model.safetensors"), load_file(tmp_path / "ckpt" / "final" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not torch.equal(a["llm_proj.weight"], load_file(tmp_path / "s1" / "final" / "model.safetensors")["llm_proj.weight"])


def test_pformer_grad_checkpointing_and_bf16_from_the_cli(tmp_path, llm_folders, bert_folder):
    text = write_sentences(tmp_path / "text.txt", 16)
    common = dict(max_steps=2)
    train_pformer(tiny_config(text, tmp_path / "plain", llm_folders["opt"], bert_folder, **common))
    train_pformer(tiny_config(text, tmp_path / "ckpt", llm_folders["opt"], bert_folder, grad_checkpointing=True, **common))
    assert [m["lm"] for m in lines(tmp_path / "plain")] == pytest.approx([m["lm"] for m in lines(tmp_path / "ckpt")], rel=1e-6)
    result = CliRunner().invoke(app, ["train-pformer", "--text", str(text), "--out", str(tmp_path / "bf16"),
                                      "--llm", str(llm_folders["opt"]), "--text-encoder", str(bert_folder),
                                      "--batch-size", "4", "--max-steps", "2", "--heldout", "4", "--n-prompt", "4",
                                      "--warmup-steps", "2",
                                      "--sample-every", "1000",
                                      "--precision", "bf16", "--grad-checkpointing", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    bf16, fp32 = lines(tmp_path / "bf16"), lines(tmp_path / "plain")
    assert bf16[0]["lm"] == pytest.approx(fp32[0]["lm"], rel=0.05) and bf16[0]["lm"] != fp32[0]["lm"]  # bf16 rounding


def test_precision_names_and_fp16_without_a_gpu_are_refused(tmp_path, world):  # noqa: F811
    with pytest.raises(BlitextError, match="--precision 'fp8'"):
        config(world, tmp_path / "x", precision="fp8")
    with pytest.raises(BlitextError, match="fp16 needs a GPU"):
        Precision("fp16", "cpu")
    assert Precision("auto", "cpu").scaler is None and not Precision("auto", "cpu").autocast._enabled
    assert Precision("bf16", "cpu").autocast.fast_dtype == torch.bfloat16


# ---------------------------------------------------------------- --accum-steps

def trained(run_config, train):
    """(the logged lines, the final weights) of a run: after 3 AdamW steps the weights follow the
    gradients' values, not only their signs (AdamW's first step is nearly sign(gradient))."""
    train(run_config)
    return lines(Path(run_config.out)), load_file(Path(run_config.out) / "final" / "model.safetensors")


def test_stage2_accumulation_equals_the_whole_batch(tmp_path, world):  # noqa: F811
    train_adapter(config(world, tmp_path / "s1", max_steps=1))
    runs = {}
    for n in (1, 2, 4):
        runs[n] = trained(config(world, tmp_path / f"a{n}", stage=2, max_steps=3, batch_size=8,
                                              init=str(tmp_path / "s1"), accum_steps=n), train_adapter)
    (one, w1), (two, w2), (four, w4) = runs[1], runs[2], runs[4]
    for other, w in ((two, w2), (four, w4)):
        assert [m["lm"] for m in other] == pytest.approx([m["lm"] for m in one], rel=1e-5, abs=1e-6)
        assert [m["align"] for m in other] == pytest.approx([m["align"] for m in one], rel=1e-5, abs=1e-7)
        assert all(torch.allclose(w[k], w1[k], rtol=1e-5, atol=1e-6) for k in w1), \
            max((w[k] - w1[k]).abs().max().item() for k in w1)


def test_pformer_accumulation_equals_the_whole_batch_for_the_lm_loss(tmp_path, llm_folders, bert_folder):
    text = write_sentences(tmp_path / "text.txt", 20)
    logged = {}
    for n in (1, 2):
        # w_contrast 0: the contrastive loss takes its negatives from each micro-batch (docs)
        cfg = tiny_config(text, tmp_path / f"p{n}", llm_folders["opt"], bert_folder, batch_size=8, max_steps=3,
                          accum_steps=n, w_contrast=0.0)
        logged[n] = trained(cfg, train_pformer)
    (one, w1), (two, w2) = logged[1], logged[2]
    assert [m["lm"] for m in two] == pytest.approx([m["lm"] for m in one], rel=1e-5)
    assert all(torch.allclose(w2[k], w1[k], rtol=1e-5, atol=1e-6) for k in w1)


def test_accumulation_refusals(tmp_path, world):  # noqa: F811
    with pytest.raises(BlitextError, match="stage 1's ITC and ITM"):
        config(world, tmp_path / "x", accum_steps=2)
    with pytest.raises(BlitextError, match="--accum-steps 0"):
        config(world, tmp_path / "x", stage=2, accum_steps=0)
    with pytest.raises(BlitextError, match=r"ranks x --accum-steps \(3\)"):
        train_adapter(config(world, tmp_path / "y", stage=2, max_steps=1, batch_size=4, accum_steps=3))
