"""extract-features end to end on real image files: bad inputs, kill -9 + resume, torchrun, refusal."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from blitext.cache import FeatureCache
from blitext.cache.manifest import sidecar_name
from blitext.errors import BlitextError
from blitext.features.image import ExtractConfig, extract_features
from blitext.models.loading import load_vision_encoder

BIN = Path(sys.executable).parent


def write_image_folder(folder: Path, n: int, bad: bool = False, seed: int = 0) -> Path:
    """n real PNG photos-to-be (random colour blocks) + captions.jsonl; optionally every bad kind."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        pixels = rng.integers(0, 255, (30 + i % 5, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
        lines.append({"image": f"img{i:03d}.png", "caption": f"picture number {i}", "id": f"img{i:03d}"})
    if bad:
        lines += write_bad_and_odd_images(folder)
    (folder / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def write_bad_and_odd_images(folder: Path) -> list[dict]:
    (folder / "empty.png").write_bytes(b"")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="PNG")
    (folder / "truncated.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "text.jpg").write_text("this is not an image")
    Image.new("L", (300, 300), 7).save(folder / "bomb.png")  # over the test's max_pixels
    Image.new("L", (20, 20), 128).save(folder / "grey.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(folder / "deep.png")
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    pal.save(folder / "palette.png", transparency=0)
    frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    names = ["empty.png", "truncated.png", "text.jpg", "bomb.png", "grey.png", "cmyk.jpg", "deep.png",
             "palette.png", "anim.gif"]
    return [{"image": n, "caption": "odd", "id": n.split(".")[0]} for n in names]


def test_bad_inputs_are_recorded_and_odd_ones_converted(tmp_path, vision_folders):
    data = write_image_folder(tmp_path / "imgs", 5, bad=True)
    cfg = ExtractConfig(data=str(data), out=str(tmp_path / "c"), vision_encoder=str(vision_folders["vit"]),
                        batch_size=4, shard_size=8, num_workers=2, max_pixels=200 * 200)
    summary = extract_features(cfg)
    reasons = {f["key"]: f["reason"] for f in summary["failures"]}
    assert set(reasons) == {"empty", "truncated", "text", "bomb"}
    assert all(key in reason for key, reason in reasons.items())  # each reason names its file
    cache = FeatureCache(tmp_path / "c")
    assert set(cache.keys) == {f"img{i:03d}" for i in range(5)} | {"grey", "cmyk", "deep", "palette", "anim"}
    # a cached row is exactly the encoder's output for that decoded image, stored as fp16
    enc = load_vision_encoder(str(vision_folders["vit"]))
    with torch.inference_mode():
        expected = enc(enc.preprocess(Image.open(data / "img003.png"))[None])[0].numpy().astype(np.float16)
    np.testing.assert_allclose(cache["img003"].astype(np.float32), expected.astype(np.float32), atol=2e-3)


def test_cache_from_another_encoder_or_preprocessing_is_refused(tmp_path, vision_folders):
    data = write_image_folder(tmp_path / "imgs", 4)
    out = tmp_path / "c"
    base = dict(data=str(data), out=str(out), batch_size=2, shard_size=2, num_workers=0)
    extract_features(ExtractConfig(vision_encoder=str(vision_folders["vit"]), **base))
    with pytest.raises(BlitextError) as e:
        extract_features(ExtractConfig(vision_encoder=str(vision_folders["clip"]), **base))
    assert "vit@" in str(e.value) and "clip@" in str(e.value)

    resized = tmp_path / "vit-336"
    import shutil

    shutil.copytree(vision_folders["vit"], resized)
    (resized / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 48, "width": 48}}))
    enc = load_vision_encoder(str(resized))
    with pytest.raises(BlitextError, match="preprocessing") as e:
        FeatureCache(out, expect=enc.producer(), fix="re-run extract-features")
    assert "48" in str(e.value) and "re-run extract-features" in str(e.value)


def test_one_encoder_folder_named_relatively_and_absolutely_is_one_encoder(tmp_path, vision_folders, monkeypatch):
    vit = vision_folders["vit"]
    data = write_image_folder(tmp_path / "imgs", 4)
    out = tmp_path / "c"
    base = dict(data=str(data), out=str(out), batch_size=2, shard_size=2, num_workers=0)
    monkeypatch.chdir(vit.parent)
    extract_features(ExtractConfig(vision_encoder=f"./{vit.name}", **base))
    assert FeatureCache(out).producer["encoder"] == str(vit.resolve())  # loadable again from any folder
    extract_features(ExtractConfig(vision_encoder=str(vit), **base))    # the same encoder: nothing to redo
    FeatureCache(out, expect=load_vision_encoder(str(vit)).producer())
    monkeypatch.chdir(vit)
    assert load_vision_encoder(".").producer() == load_vision_encoder(str(vit)).producer()


def run_cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "blitext"), *args], capture_output=True, text=True, **kw)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.h5"))}


def comparable_manifest(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["provenance"]["config"].pop("out")
    return manifest


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    data = write_image_folder(tmp_path / "imgs", 48)
    args = ["extract-features", "--data", str(data), "--batch-size", "4", "--shard-size", "4", "--num-workers", "1"]
    env = {**os.environ, "BLITEXT_CACHE": os.environ["BLITEXT_CACHE"]}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([str(BIN / "blitext"), *args, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / sidecar_name(2)).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(killed.glob("shard-*.json")))
    assert 3 <= done < 12, f"the kill should land mid-run ({done} of 12 shards done)"
    assert not (killed / "manifest.json").exists()

    resumed = run_cli(*args, "--out", str(killed), env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    fresh = run_cli(*args, "--out", str(tmp_path / "fresh"), env=env)
    assert fresh.returncode == 0, fresh.stderr
    assert shard_bytes(killed) == shard_bytes(tmp_path / "fresh")  # bit for bit
    assert comparable_manifest(killed) == comparable_manifest(tmp_path / "fresh")


def test_torchrun_two_ranks_equal_one_process(tmp_path, vision_folders):
    data = write_image_folder(tmp_path / "imgs", 21, bad=True)
    args = ["extract-features", "--data", str(data), "--vision-encoder", str(vision_folders["vit"]),
            "--batch-size", "2", "--shard-size", "4", "--num-workers", "0"]
    # Byte equality holds when every process runs the same number of intra-op threads (float sums
    # split over threads add in another order): torchrun gives each rank one, so the reference does too.
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = run_cli(*args, "--out", str(tmp_path / "one"), env=one_thread)
    assert single.returncode == 0, single.stderr
    two = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python",
                          str(BIN / "blitext"), *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=one_thread)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two" / "logs" / "extract.rank1.log").exists()  # every rank wrote its own log
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    assert comparable_manifest(tmp_path / "one") == comparable_manifest(tmp_path / "two")
    # At the machine's default thread count the values agree to rounding, not to the byte.
    many = run_cli(*args, "--out", str(tmp_path / "many"), env={k: v for k, v in os.environ.items()
                                                                 if k != "OMP_NUM_THREADS"})
    assert many.returncode == 0, many.stderr
    one, other = FeatureCache(tmp_path / "one"), FeatureCache(tmp_path / "many")
    assert one.keys == other.keys
    torch.testing.assert_close(one.get_batch(one.keys)[0].float(), other.get_batch(one.keys)[0].float(),
                               rtol=2e-3, atol=2e-3)  # fp16 rows: one unit in the last place


def test_user_mistakes_are_one_line_errors(tmp_path):
    from blitext.cli.main import app

    result = CliRunner().invoke(app, ["extract-features", "--data", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "nowhere" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["extract-features", "--batch-size", "3", "--shard-size", "10"])
    assert result.exit_code == 2 and "multiple of batch_size" in result.output
