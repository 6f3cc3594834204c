"""train-pformer end to end on tiny models: exact resume, torchrun == one process, input reporting, frozen LLM."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import blitext.pformer.train
from blitext.errors import BlitextError
from blitext.models.loading import load_llm, load_text_encoder
from blitext.models.pformer import PFormer
from blitext.pformer.train import Batcher, PFormerConfig, TrainLoop, train_pformer
from blitext.training import read_metrics
from conftest import BERT_WORDS

BIN = Path(sys.executable).parent
WORDS = [w for w in BERT_WORDS if w.isalpha() and w.islower()]  # real words: the tiny BERT vocab covers them
LOSSES = ("lm", "contrast", "vocab", "loss")


def write_sentences(path: Path, n: int, seed: int = 0, extra: list[str] = ()) -> Path:
    """n distinct sentences of 2-3 words (at most ~20 LLM tokens: none is truncated at 32)."""
    rng = random.Random(seed)
    sentences: list[str] = []
    while len(sentences) < n:
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 3)))
        if s not in sentences:
            sentences.append(s)
    path.write_text("\n".join([*sentences, *extra]) + "\n")
    return path


def tiny_config(text: Path, out: Path, llm: Path, bert: Path, **kw) -> PFormerConfig:
    values = dict(text=[str(text)], out=str(out), llm=str(llm), text_encoder=str(bert), batch_size=4, heldout=4,
                  n_prompt=4, warmup_steps=2, sample_every=1000, n_samples=2, log_every=1, device="cpu")
    return PFormerConfig(**{**values, **kw})


def step_lines(metrics: Path) -> list[dict]:
    return [m for m in read_metrics(metrics) if "loss" in m]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def test_resume_gives_the_same_loss_sequence(tmp_path, llm_folders, bert_folder, monkeypatch):
    text = write_sentences(tmp_path / "text.txt", 24)
    # max_text_len 12 truncates most LLM targets, so the final truncation counts are not zero
    settings = dict(max_steps=6, save_every=2, max_text_len=12)
    train_pformer(tiny_config(text, tmp_path / "a", llm_folders["opt"], bert_folder, **settings))

    real_step = TrainLoop.train_step

    def interrupted(self, step, steps, batch=None):
        if step == 3:
            raise KeyboardInterrupt  # as Ctrl-C after step 2 trained and was logged, past checkpoint step-2
        return real_step(self, step, steps, batch)

    b = tmp_path / "b"
    monkeypatch.setattr(TrainLoop, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_pformer(tiny_config(text, b, llm_folders["opt"], bert_folder, **settings))
    monkeypatch.setattr(TrainLoop, "train_step", real_step)
    assert (b / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    assert [m["step"] for m in step_lines(b / "metrics.jsonl")] == [0, 1, 2]  # step 2 was logged, then lost
    with pytest.raises(BlitextError, match="--resume latest"):  # no silent restart over an existing run
        train_pformer(tiny_config(text, b, llm_folders["opt"], bert_folder, **settings))

    train_pformer(tiny_config(text, b, llm_folders["opt"], bert_folder, resume="latest", **settings))

    a_lines, b_lines = step_lines(tmp_path / "a" / "metrics.jsonl"), step_lines(b / "metrics.jsonl")
    assert [m["step"] for m in b_lines] == list(range(6))  # each step exactly once
    for ma, mb in zip(a_lines, b_lines):
        # same machine, same process: the replayed steps are bit-identical, not merely close
        assert {k: mb[k] for k in (*LOSSES, "lr", "temp")} == {k: ma[k] for k in (*LOSSES, "lr", "temp")}
    assert len([m for m in read_metrics(b / "metrics.jsonl") if "heldout_token_accuracy" in m]) == 1
    wa, wb = final_weights(tmp_path / "a"), final_weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    state_a = json.loads((tmp_path / "a" / "final" / "state.json").read_text())
    state_b = json.loads((b / "final" / "state.json").read_text())
    assert state_a["truncated"]["target"] > 0
    assert state_b["truncated"] == state_a["truncated"]  # counts carry over the resume, not restart at 0


def dropout_free_bert(bert_folder: Path, folder: Path) -> Path:
    """The tiny BERT without dropout: two-view SimCSE is then deterministic whatever the rank layout."""
    shutil.copytree(bert_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_two_rank_ddp_matches_one_process(tmp_path, llm_folders, bert_folder):
    bert = dropout_free_bert(bert_folder, tmp_path / "bert-no-dropout")
    text = write_sentences(tmp_path / "text.txt", 24)
    # max_text_len 12 truncates most LLM targets: the counts must cover both ranks' sentences
    (tmp_path / "config.json").write_text(json.dumps({"log_every": 1, "warmup_steps": 1, "max_text_len": 12}))
    train_pformer(tiny_config(text, tmp_path / "one", llm_folders["opt"], bert, max_steps=3, warmup_steps=1,
                              max_text_len=12))
    args = ["train-pformer", "--text", str(text), "--llm", str(llm_folders["opt"]), "--text-encoder", str(bert),
            "--batch-size", "4", "--max-steps", "3", "--n-prompt", "4", "--heldout", "4", "--sample-every", "1000",
            "--device", "cpu", "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "two")]
    two = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python",
                          str(BIN / "blitext"), *args], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two" / "logs" / "train-pformer.rank1.log").exists()  # every rank keeps its own log

    one_lines, two_lines = step_lines(tmp_path / "one" / "metrics.jsonl"), step_lines(tmp_path / "two" / "metrics.jsonl")
    assert [m["step"] for m in two_lines] == [m["step"] for m in one_lines] == [0, 1, 2]
    for m1, m2 in zip(one_lines, two_lines):
        # Close, not equal: each rank pads and sums its own 2 sentences (another float summation
        # order), DDP averages the two ranks' gradients, and the logged value is the mean over
        # ranks. The LM loss is scaled by each rank's share of the global batch's text tokens,
        # so it is the same global token mean one process takes, up to rounding. The contrast
        # loss gathers the negatives of both ranks: over 2 local rows only it would be ~ln 2,
        # not ~ln 4.
        for k in LOSSES:
            assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-5), (m1["step"], k, m1[k], m2[k])
        assert m2["lr"] == m1["lr"]
    state1, state2 = (json.loads((tmp_path / r / "final" / "state.json").read_text()) for r in ("one", "two"))
    assert state1["truncated"]["target"] > 0
    assert state2["truncated"] == state1["truncated"]
    w1, w2 = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for k in (k for k in w1 if not k.endswith("key.bias")):  # softmax ignores a key bias: its gradient is rounding noise that AdamW turns into full steps
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_text_inputs_are_reported_not_dropped_silently(tmp_path, llm_folders, bert_folder):
    from blitext.cli.main import app
    from blitext.data.text import read_sentences

    # empty and blank lines: skipped and counted
    f = tmp_path / "gaps.txt"
    f.write_text("a red circle\n\n   \ntwo dogs play\n")
    corpus = read_sentences([str(f)])
    assert corpus.sentences == ["a red circle", "two dogs play"]
    assert corpus.ids == ["gaps.txt:1", "gaps.txt:4"]  # ids keep the file's line numbers
    assert corpus.counts["empty skipped"] == 2

    # undecodable bytes: an error naming the file and line, or replaced and counted
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"a red circle\ntwo dogs\nthe caf\xe9 grass\n")
    with pytest.raises(BlitextError) as e:
        read_sentences([str(bad)])
    assert f"{bad}:3" in str(e.value) and "--bad-bytes replace" in str(e.value)
    corpus = read_sentences([str(bad)], bad_bytes="replace")
    assert corpus.sentences[2] == "the caf\ufffd grass"
    assert corpus.counts["lines with replaced bytes"] == 1

    # a very long line is truncated to max_text_len and counted; the counts land in state.json.
    # 8 training sentences, batch 4, 2 steps: one epoch sees each training sentence once, and
    # the end-of-run samples see each held-out one once, so the long line is counted exactly once.
    long_line = " ".join(WORDS[i % len(WORDS)] for i in range(200))
    text = write_sentences(tmp_path / "text.txt", 11, extra=["", long_line, "  "])
    train_pformer(tiny_config(text, tmp_path / "run", llm_folders["opt"], bert_folder, max_steps=2,
                              max_text_len=24))
    state = json.loads((tmp_path / "run" / "final" / "state.json").read_text())
    assert state["truncated"] == {"encoder": 1, "target": 1}
    assert state["corpus_counts"]["empty skipped"] == 2
    assert state["corpus_counts"]["sentences"] == 12

    # a missing --text file: one red line and exit code 2, no traceback
    result = CliRunner().invoke(app, ["train-pformer", "--text", str(tmp_path / "missing.txt"), "--llm",
                                      str(llm_folders["opt"]), "--text-encoder", str(bert_folder),
                                      "--out", str(tmp_path / "nowhere")])
    assert result.exit_code == 2, result.output
    assert "missing.txt" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "nowhere").exists()


def test_truncation_counts_only_texts_that_lost_tokens(llm_folders, bert_folder):
    """A text of exactly max_text_len tokens fits: it is not reported as truncated."""
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(bert_folder)
    llm = load_llm(str(llm_folders["opt"]))  # as the trainer has it (pad = eos)
    text = " ".join(WORDS[:10])
    n_enc = len(enc(text).input_ids)  # [CLS] + 10 words + [SEP]
    n_llm = len(llm.tokenizer(text + "\n", add_special_tokens=False).input_ids)
    assert 4 < min(n_enc, n_llm) - 1
    for max_len in (n_enc, n_enc - 1, n_llm, n_llm - 1):
        batcher = Batcher(enc, llm, PFormerConfig(max_text_len=max_len))
        t = batcher.encoder_inputs([text, "a red"])
        g = batcher.targets([text, "a red"])
        assert (t.input_ids.shape[1], g.tensors["input_ids"].shape[1]) == (min(n_enc, max_len), min(n_llm, max_len))
        assert dict(batcher.truncated) == {"encoder": int(n_enc > max_len), "target": int(n_llm > max_len)}, max_len


@pytest.mark.parametrize("kind", ["opt", "llama", "gpt2"])
def test_llm_weights_never_change(tmp_path, llm_folders, bert_folder, monkeypatch, kind):
    llm_folder = llm_folders[kind]
    on_disk = {p.name: p.read_bytes() for p in llm_folder.iterdir() if p.is_file()}
    before = load_file(llm_folder / "model.safetensors")
    loaded = []  # the LLM object the trainer uses, kept to look at after training
    real_load_llm = blitext.pformer.train.load_llm

    def keep_llm(*args, **kwargs):
        loaded.append(real_load_llm(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(blitext.pformer.train, "load_llm", keep_llm)

    text = write_sentences(tmp_path / "text.txt", 16)
    run = tmp_path / "run"
    train_pformer(tiny_config(text, run, llm_folder, bert_folder, max_steps=3, save_every=1, warmup_steps=1))

    # the LLM the trainer used, in memory, is still the one on disk; the disk copy is untouched
    live = loaded[0].model.state_dict()
    assert all(torch.equal(live[k], before[k]) for k in before), "the frozen LLM changed during training"
    assert {p.name: p.read_bytes() for p in llm_folder.iterdir() if p.is_file()} == on_disk

    # checkpoints hold exactly the P-Former's trainable parameters: no LLM tensor anywhere in the run
    pformer = PFormer(load_text_encoder(str(bert_folder)).model, d_llm=32, n_prompt=4)
    trainable = {n for n, p in pformer.named_parameters() if p.requires_grad}
    folders = [*sorted((run / "checkpoints").glob("step-*")), run / "final"]
    for folder in folders:
        assert set(load_file(folder / "model.safetensors")) == trainable, folder
        state = json.loads((folder / "state.json").read_text())
        assert state["llm_fingerprint"] == loaded[0].fingerprint  # the LLM is named, not stored
    assert not any(p.requires_grad for p in loaded[0].model.parameters())
    weight_files = {p.relative_to(run) for p in run.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth")}
    # step-2 is a mid-run checkpoint (with optimizer state); step-3, the end, and final have none
    assert [f.name for f in folders] == ["step-0000002", "step-0000003", "final"]
    assert weight_files == {f.relative_to(run) / "model.safetensors" for f in folders} | \
        {Path("checkpoints/step-0000002/optimizer.pt")}
    optimizer = torch.load(folders[0] / "optimizer.pt", weights_only=True)
    assert len(optimizer["param_groups"][0]["params"]) == len(trainable)


def test_a_batch_that_does_not_split_over_the_ranks_is_refused():
    from blitext.training import rank_slice, require_batch_splits

    require_batch_splits(8, 2)
    assert [rank_slice(list(range(8)), r, 2) for r in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(BlitextError, match=r"batch_size 9 must divide by the number of ranks x --accum-steps \(2\)"):
        require_batch_splits(9, 2)  # rank_slice would drop row 8 unseen
