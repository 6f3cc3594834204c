"""Issue 22, on tiny trained runs: every load of a run's weights checks the sha256 its state.json
records (--init, generate/eval/blitext.load, export and a P-Former for build-prompts refuse damaged
weights in one line instead of using them); eval scores the images that have features with
--skip-missing; a full disk while eval writes its results is one line."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import blitext
from blitext.adapter.image import train_adapter
from blitext.errors import BlitextError
from blitext.evaluation.evaluate import EvalConfig, eval_caption
from blitext.export import ExportConfig, export_run
from blitext.models.adapter_checkpoint import load_adapter
from blitext.pformer.prompts import load_pformer
from adapter_world import config, world  # noqa: F401


def flip_bytes(path: Path, count: int = 16) -> None:
    """Damage tensor data near the end of a safetensors file: the header still parses, values change."""
    raw = bytearray(path.read_bytes())
    for i in range(count):
        raw[-64 - 4 * i] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory) -> dict:  # noqa: F811
    root = tmp_path_factory.mktemp("runs")
    train_adapter(config(world, root / "s1", max_steps=2))
    train_adapter(config(world, root / "s2", stage=2, max_steps=2, init=str(root / "s1")))
    return {"s1": root / "s1", "s2": root / "s2"}


@pytest.fixture(scope="module")
def damaged(world, runs, tmp_path_factory) -> dict:  # noqa: F811
    root = tmp_path_factory.mktemp("damaged")
    for name in ("s1", "s2"):
        shutil.copytree(runs[name], root / name)
    shutil.copytree(world["root"] / "pformer", root / "pformer")
    for weights in (root / "s1" / "final", root / "s2" / "final", root / "pformer" / "final"):
        flip_bytes(weights / "model.safetensors")
    return {"root": root, "s1": root / "s1", "s2": root / "s2", "pformer": root / "pformer"}


def refused(call) -> str:
    with pytest.raises(BlitextError) as e:
        call()
    text = str(e.value)
    assert "model.safetensors" in text and "sha256" in text and "\n" not in text
    return text


def test_load_adapter_refuses_damaged_weights(damaged):
    assert str(damaged["s2"] / "final") in refused(lambda: load_adapter(damaged["s2"]))


def test_blitext_load_refuses_damaged_weights(damaged):
    refused(lambda: blitext.load(damaged["s2"], device="cpu"))


def test_export_refuses_damaged_weights(damaged, tmp_path):
    refused(lambda: export_run(ExportConfig(run=str(damaged["s2"]), out=str(tmp_path / "out"))))
    assert not (tmp_path / "out").exists()


def test_init_refuses_damaged_weights(damaged, world, tmp_path):  # noqa: F811
    refused(lambda: train_adapter(config(world, tmp_path / "s2", stage=2, max_steps=1, init=str(damaged["s1"]))))


def test_a_pformer_with_damaged_weights_is_refused(damaged):
    refused(lambda: load_pformer(damaged["pformer"]))


# ---------------------------------------------------------------- eval: missing features, a full disk

FAST = dict(num_beams=1, max_new_tokens=2, min_new_tokens=1, batch_size=4, device="cpu", meteor="off", spice="off",
            tokenizer="python")


def captions_with_a_ghost(world, folder: Path) -> Path:  # noqa: F811
    """Three of the world's images and one the feature cache does not hold."""
    entries = json.loads(Path(world["captions"]).read_text())[:3]
    entries.append({"image": "images/0.png", "image_id": "ghost", "caption": ["a ghost"]})
    path = folder / "captions_ghost.json"
    path.write_text(json.dumps(entries))
    return path


def test_eval_skip_missing_scores_the_images_with_features_and_counts_the_rest(world, runs, tmp_path):  # noqa: F811
    data = captions_with_a_ghost(world, Path(world["captions"]).parent)
    cfg = dict(adapter=str(runs["s2"]), features=str(world["features"]), data=str(data), **FAST)
    with pytest.raises(BlitextError, match="1 of 4 images .*'ghost'.*--skip-missing"):
        eval_caption(EvalConfig(**cfg, out=str(tmp_path / "refused")))
    record = eval_caption(EvalConfig(**cfg, out=str(tmp_path / "e"), skip_missing=True))
    assert record["counts"] == {"images": 3, "skipped_no_features": 1}
    assert len(json.loads((tmp_path / "e" / "predictions.json").read_text())) == 3


def test_a_full_disk_while_eval_writes_is_one_line(world, runs, tmp_path):  # noqa: F811
    """The file-size limit stands in for a full disk (writes past it fail with EFBIG)."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60, 60))  # predictions.json is larger

    out = tmp_path / "e"
    args = ["eval", "caption", "--adapter", str(runs["s2"]), "--features", str(world["features"]), "--data",
            str(world["captions"]), "--limit", "2", "--out", str(out), "--device", "cpu", "--num-beams", "1",
            "--max-new-tokens", "2", "--min-new-tokens", "1", "--meteor", "off", "--spice", "off"]
    proc = subprocess.run([str(Path(sys.executable).parent / "blitext"), *args], capture_output=True, text=True,
                          preexec_fn=limit_file_size, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and f"writing in {out} failed" in text and "eval again" in text
    assert not out.exists() or not [p for p in out.iterdir() if p.name.endswith(".json")]
