"""Two "nodes" on this machine: two torchrun launchers (--nnodes 2 --node-rank 0/1) meeting at a
rendezvous on 127.0.0.1 over gloo train the P-Former as one process does (docs/scale.md)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from blitext.pformer.train import train_pformer
from test_pformer_train import LOSSES, dropout_free_bert, final_weights, step_lines, tiny_config, write_sentences

BIN = __import__("pathlib").Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(args: list[str], nodes: int = 2) -> list[subprocess.CompletedProcess]:
    """One torchrun per node, as each machine of a cluster would run it (static rendezvous)."""
    port = free_port()
    procs = [subprocess.Popen([str(BIN / "torchrun"), "--nnodes", str(nodes), "--node-rank", str(rank),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "--no-python", str(BIN / "blitext"), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(nodes)]
    done = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def test_two_nodes_train_the_pformer_as_one_process_does(tmp_path, llm_folders, bert_folder):
    bert = dropout_free_bert(bert_folder, tmp_path / "bert-no-dropout")
    text = write_sentences(tmp_path / "text.txt", 16)
    train_pformer(tiny_config(text, tmp_path / "one", llm_folders["opt"], bert, max_steps=2, warmup_steps=1))
    (tmp_path / "config.json").write_text(json.dumps({"log_every": 1, "warmup_steps": 1}))
    args = ["train-pformer", "--text", str(text), "--llm", str(llm_folders["opt"]), "--text-encoder", str(bert),
            "--batch-size", "4", "--max-steps", "2", "--n-prompt", "4", "--heldout", "4", "--sample-every", "1000",
            "--device", "cpu", "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "two")]
    for node, result in enumerate(launch_nodes(args)):
        assert result.returncode == 0, (node, result.stderr[-3000:])
    assert (tmp_path / "two" / "logs" / "train-pformer.rank1.log").exists()  # the second node's rank ran

    one, two = step_lines(tmp_path / "one" / "metrics.jsonl"), step_lines(tmp_path / "two" / "metrics.jsonl")
    assert [m["step"] for m in two] == [m["step"] for m in one] == [0, 1]
    for m1, m2 in zip(one, two):  # close, not equal: see test_pformer_train's two-rank test
        for k in LOSSES:
            assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-5), (m1["step"], k, m1[k], m2[k])
    w1, w2 = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for k in (k for k in w1 if not k.endswith("key.bias")):  # softmax ignores a key bias: its gradient is rounding noise that AdamW turns into full steps
        assert (w2[k] - w1[k]).abs().max() <= 1e-5 + 1e-4 * w1[k].abs().max(), k


def test_a_bad_input_that_stops_rank_0_is_one_line_on_every_node(tmp_path, llm_folders, bert_folder):
    """Rank 0 reads the text for every rank; its error reaches the node waiting for it, instead
    of that node's rank dying of the lost connection with a gloo traceback."""
    text = write_sentences(tmp_path / "text.txt", 16)
    text.write_bytes(text.read_bytes() + b"caf\xe9 in latin-1\n")
    args = ["train-pformer", "--text", str(text), "--llm", str(llm_folders["opt"]), "--text-encoder", str(bert_folder),
            "--batch-size", "4", "--max-steps", "2", "--n-prompt", "4", "--heldout", "4", "--device", "cpu",
            "--out", str(tmp_path / "two")]
    first, second = launch_nodes(args)
    why = f"{text}:17: bytes b'\\xe9' at column 4 are not UTF-8"
    assert first.returncode != 0 and f"error: {why}" in first.stderr
    assert second.returncode != 0 and "error: rank 0 stopped while reading the" in second.stderr and why in second.stderr
    assert "[rank1]" not in second.stderr and "Connection closed" not in second.stderr  # no traceback of its own


def test_a_cache_rank_0_refuses_is_one_line_on_every_node(tmp_path, vision_folders):
    """extract-features into another encoder's cache: rank 0 refuses it when starting the job
    (blitext/cache/jobs.py); the node waiting for it says so in one line."""
    from blitext.features.image import ExtractConfig, extract_features
    from test_extract import write_image_folder

    data = write_image_folder(tmp_path / "imgs", 4)
    out = tmp_path / "c"
    extract_features(ExtractConfig(data=str(data), out=str(out), vision_encoder=str(vision_folders["vit"]),
                                   batch_size=2, shard_size=2, num_workers=0))
    first, second = launch_nodes(["extract-features", "--data", str(data), "--out", str(out), "--batch-size", "2",
                                  "--shard-size", "2", "--num-workers", "0", "--device", "cpu",
                                  "--vision-encoder", str(vision_folders["clip"])])
    assert first.returncode != 0 and "clip@" in first.stderr
    assert second.returncode != 0 and f"error: rank 0 stopped while starting the cache {out}:" in second.stderr
    assert "clip@" in second.stderr and "[rank1]" not in second.stderr and "Connection closed" not in second.stderr
