"""The memory levers every trainer takes: --grad-checkpointing (the frozen LLM's activations
recomputed in backward: the same numbers) and --precision (bf16 autocast on CPU too; fp16 needs
a GPU); and the trainer skeleton they share."""
from __future__ import annotations

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
