"""The memory levers every trainer takes: --grad-checkpointing (the frozen LLM's activations
recomputed in backward: the same numbers) and --precision (bf16 autocast on CPU too; fp16 needs
a GPU); and the trainer skeleton they share."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from blitext.adapter.image import train_adapter
from blitext.cli.main import app
from blitext.errors import BlitextError
from blitext.loop import Precision, TrainerLoop, resume_run
from blitext.pformer.train import train_pformer
from blitext.training import read_metrics
from adapter_world import config, world  # noqa: F401
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


@pytest.mark.parametrize("kind", ["opt", "llama", "gpt2"])
def test_checkpoint_layers_wraps_every_layer_and_recomputes_it_in_backward(kind, llm_folders):
    """Same numbers alone would also hold if checkpointing did nothing: count the work instead.
    Each decoder layer's attention runs once in forward and again when backward recomputes it."""
    from blitext.models.loading import load_llm

    llm = load_llm(str(llm_folders[kind]))
    layers = [m for m in llm.model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))]
    calls = {id(layer): 0 for layer in layers}
    for layer in layers:
        attention = next(c for name, c in layer.named_children() if "attn" in name)
        attention.register_forward_hook(lambda m, i, o, key=id(layer): calls.__setitem__(key, calls[key] + 1))

    def one_backward() -> list[int]:
        for key in calls:
            calls[key] = 0
        prompts = torch.randn(2, 4, llm.width, requires_grad=True)
        llm.lm_loss(prompts, llm.lm_batch(["a red circle", "two dogs"], "\n", 16)).backward()
        assert prompts.grad.abs().sum() > 0
        return list(calls.values())

    assert one_backward() == [1] * len(layers)
    assert llm.checkpoint_layers() == len(layers) == llm.model.config.num_hidden_layers
    assert one_backward() == [2] * len(layers)  # forward, then the recomputation in backward


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
        kept = [k for k in w1 if not k.endswith("key.bias")]  # softmax ignores a key bias: its gradient is rounding noise that AdamW turns into full steps
        assert all(torch.allclose(w[k], w1[k], rtol=1e-5, atol=1e-6) for k in kept), \
            max((w[k] - w1[k]).abs().max().item() for k in kept)


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
    assert all(torch.allclose(w2[k], w1[k], rtol=1e-5, atol=1e-6) for k in w1 if not k.endswith("key.bias"))


def test_accumulation_refusals(tmp_path, world):  # noqa: F811
    with pytest.raises(BlitextError, match="stage 1's ITC and ITM"):
        config(world, tmp_path / "x", accum_steps=2)
    with pytest.raises(BlitextError, match="--accum-steps 0"):
        config(world, tmp_path / "x", stage=2, accum_steps=0)
    with pytest.raises(BlitextError, match=r"ranks x --accum-steps \(3\)"):
        train_adapter(config(world, tmp_path / "y", stage=2, max_steps=1, batch_size=4, accum_steps=3))


# ---------------------------------------------------------------- fp16's loss scaler

class ScaledLoop(TrainerLoop):
    """A one-Linear trainer whose fp16 loss scaler runs on CPU (torch.amp.GradScaler('cpu')): the
    bookkeeping of --precision fp16 without a GPU. Step 1's loss is inf, so that step is skipped
    and the scale halves; every 2 good steps it doubles."""

    def __init__(self, config, model):
        super().__init__(config, model, "cpu", SimpleNamespace(rank=0, world=1, is_main=True), None, None)
        self.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=2)
        self.scales = []

    def train_step(self, step, steps, batch):
        self.scales.append(self.precision.scaler.get_scale())

        def micro():
            loss = self.model(torch.ones(1, 2)).pow(2).sum()
            return {}, loss * float("inf") if step == 1 else loss
        return self.accumulated(micro, (), lambda: None, None, max_grad_norm=1.0)


def scaled_run(run: Path, start_at_resume: bool, steps: int = 5) -> tuple[list[float], torch.Tensor]:
    """(the loss scale each step saw, the final weight) of ScaledLoop, in one go or resumed from step 2."""
    config = SimpleNamespace(precision="fp32", accum_steps=1, batch_size=1, save_every=2, log_every=1,
                             snapshot_steps=[], resume="latest" if start_at_resume else None)
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    start, _ = resume_run(run, config, model, optimizer, {})
    loop = ScaledLoop(config, model)
    loop.run(start, steps, run, optimizer, {})
    return loop.scales, model.weight.detach().clone()


def test_fp16_loss_scale_is_checkpointed_and_restored_on_resume(tmp_path):
    scales, weight = scaled_run(tmp_path / "a", False)
    assert scales == [2.0 ** 16, 2.0 ** 16, 2.0 ** 15, 2.0 ** 15, 2.0 ** 16]  # halved by the inf step, then grown
    saved = json.loads((tmp_path / "a" / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert saved["grad_scaler"]["scale"] == 2.0 ** 16 and saved["grad_scaler"]["_growth_tracker"] == 0
    # a run stopped after step 2's checkpoint resumes with the scale (and growth count) it had
    scaled_run(tmp_path / "b", False, steps=3)
    assert json.loads((tmp_path / "b" / "checkpoints" / "step-0000002" / "state.json").read_text())["grad_scaler"] == \
        {"scale": 2.0 ** 15, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2, "_growth_tracker": 0}
    resumed, resumed_weight = scaled_run(tmp_path / "b", True)
    assert resumed == scales[2:]
    assert torch.equal(resumed_weight, weight)
