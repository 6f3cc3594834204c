"""Issue 22: every load of a run's weights checks the sha256 its state.json records: --init,
generate/eval/blitext.load (load_adapter), export and a P-Former (build-prompts) refuse damaged
weights in one line instead of using them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import blitext
from blitext.adapter.image import train_adapter
from blitext.errors import BlitextError
from blitext.export import ExportConfig, export_run
from blitext.models.adapter_checkpoint import load_adapter
from blitext.pformer.prompts import load_pformer
from test_adapter import config, world  # noqa: F401


def flip_bytes(path: Path, count: int = 16) -> None:
    """Damage tensor data near the end of a safetensors file: the header still parses, values change."""
    raw = bytearray(path.read_bytes())
    for i in range(count):
        raw[-64 - 4 * i] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def damaged(world, tmp_path_factory) -> dict:  # noqa: F811
    root = tmp_path_factory.mktemp("damaged")
    train_adapter(config(world, root / "s1", max_steps=2))
    train_adapter(config(world, root / "s2", stage=2, max_steps=2, init=str(root / "s1")))
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
