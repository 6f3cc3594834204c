"""blitext export: a run on BLIP-2's vision tower loads in transformers' own BLIP-2 classes and
writes the same token ids (stage 2) or scores (stage 1) as blitext; other runs export the adaptor."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

import blitext
from blitext.adapter.image import AdapterConfig, train_adapter
from blitext.cache import FeatureCache
from blitext.cli.main import app
from blitext.errors import BlitextError
from blitext.export import ExportConfig, export_run
from blitext.features.image import ExtractConfig, extract_features
from blitext.models.adapter_checkpoint import load_adapter
from blitext.models.loading import load_vision_encoder
from conftest import assert_tells_apart, make_tokenizer
from adapter_world import N_PROMPT, write_images
from test_pformer_train import dropout_free_bert
from test_t5 import make_t5_folder


def exact_vocab_gpt2(folder):
    """A tiny GPT-2 whose embedding has exactly one row per token: the image token needs a new row."""
    import transformers as tf

    tokenizer = make_tokenizer(folder)
    tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tokenizer),
                                     n_positions=128)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip2_world(tmp_path_factory, vision_folders, llm_folders, bert_folder) -> dict:
    """Features from a tiny BLIP-2 vision tower; stage 1, and stage 2 for two LLMs, a few steps each."""
    root = tmp_path_factory.mktemp("export")
    bert = dropout_free_bert(bert_folder, root / "bert")
    captions = write_images(root / "data", 8)
    features = root / "features"
    extract_features(ExtractConfig(data=str(captions), out=str(features), vision_encoder=str(vision_folders["blip2"]),
                                   batch_size=4, shard_size=8, num_workers=0, device="cpu"))
    rows, _ = FeatureCache(features).get_batch(FeatureCache(features).keys[:4])
    for i in range(3):  # parity below means something only if each image has features of its own
        assert_tells_apart(rows[i], rows[i + 1], f"the tiny BLIP-2 tower's features of images {i} and {i + 1}")
    common = dict(features=str(features), captions=[str(captions)], text_encoder=str(bert), batch_size=4,
                  warmup_steps=1, lr=1e-3, n_prompt=N_PROMPT, w_align=0.0, device="cpu", embed_dim=16, log_every=1)
    s1 = root / "s1"
    train_adapter(AdapterConfig(**common, stage=1, max_steps=3, llm=str(llm_folders["opt"]), out=str(s1)))
    runs = {"s1": s1}
    t5 = make_t5_folder(root / "t5")
    for name, llm in (("opt", llm_folders["opt"]), ("gpt2-exact", exact_vocab_gpt2(root / "gpt2-exact")), ("t5", t5)):
        runs[name] = root / f"s2-{name}"
        train_adapter(AdapterConfig(**common, stage=2, max_steps=3, llm=str(llm), out=str(runs[name]),
                                    init=str(s1) if name == "opt" else None))
    return {"root": root, "captions": captions, "features": features, "runs": runs,
            "images": [Image.open(root / "data" / "images" / f"{i}.png") for i in range(4)]}


@pytest.mark.parametrize("llm", ["opt", "gpt2-exact", "t5"])
def test_stage2_exports_to_blip2_for_conditional_generation_with_the_same_token_ids(tmp_path, blip2_world, llm):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    run, out = blip2_world["runs"][llm], tmp_path / "hf"
    result = CliRunner().invoke(app, ["export", str(run), str(out)])
    assert result.exit_code == 0, result.output
    hf = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    processor = Blip2Processor.from_pretrained(out)
    images = blip2_world["images"]
    inputs = processor(images=images, text=[""] * len(images), return_tensors="pt")
    with torch.no_grad():
        # the run's settings and stop tokens travel in generation_config.json; Blip2 hands generate_kwargs on
        hf_ids = hf.generate(**inputs, generation_config=hf.generation_config)
    if not hf.config.text_config.is_encoder_decoder:  # a causal LLM's output starts with its input ids
        hf_ids = hf_ids[:, inputs["input_ids"].shape[1]:]

    model = blitext.load(run, device="cpu")
    features, _ = model.visual_tokens(images)
    torch.testing.assert_close(processor.image_processor(images, return_tensors="pt")["pixel_values"],
                               torch.stack([model.encoder.preprocess(i.convert("RGB")) for i in images]))
    s = model.settings("caption")
    with torch.no_grad():
        ours = model.llm.generate_ids(model.adapter.model.prompts(features), [s.prompt] * len(images),
                                      model.adapter.end_of_text, s.max_new_tokens, s.num_beams, s.min_new_tokens,
                                      s.length_penalty)
    pad = model.llm.tokenizer.pad_token_id
    strip = lambda ids: [[t for t in row if t != pad] for row in ids.tolist()]  # noqa: E731
    with torch.no_grad():
        prompts = model.adapter.model.prompts(features.clone())
    assert (prompts[0] - prompts[1]).abs().max() > 1e-2  # the image reaches the LLM: parity below can tell images apart
    if llm != "gpt2-exact":  # the tiny GPT-2 repeats one token whatever it reads; the other two follow the image
        assert len({tuple(row) for row in strip(ours)}) > 1, strip(ours)  # images get captions of their own
    assert strip(hf_ids) == strip(ours)
    texts = [t.split("\n")[0].strip() for t in processor.batch_decode(hf_ids, skip_special_tokens=True)]
    assert texts == model.caption(images)
    image_id = hf.config.image_token_index
    assert processor.tokenizer.convert_ids_to_tokens(image_id) == "<image>"
    new_row = image_id >= model.llm.model.get_input_embeddings().weight.shape[0]
    assert new_row or llm != "gpt2-exact"
    assert (hf.generation_config.suppress_tokens == [image_id]) == new_row  # only a new row is suppressed
    after = inputs["input_ids"][0, N_PROMPT:].tolist()
    assert inputs["input_ids"][0, :N_PROMPT].tolist() == [image_id] * N_PROMPT
    assert after == ([processor.tokenizer.eos_token_id] if llm == "t5" else [])  # T5: "</s>"; causal: no BOS


def test_stage1_exports_to_blip2_for_image_text_retrieval_with_the_same_scores(tmp_path, blip2_world):
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    out, _ = export_run(ExportConfig(run=str(blip2_world["runs"]["s1"]), out=str(tmp_path / "itm")))
    hf = Blip2ForImageTextRetrieval.from_pretrained(out).eval()
    processor = Blip2Processor.from_pretrained(out)
    images, texts = blip2_world["images"][:2], ["a red circle", "a blue square"]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        itc = hf(**inputs, use_image_text_matching_head=False).logits_per_image  # (images, texts)
        itm = hf(**inputs, use_image_text_matching_head=True).logits_per_image   # (pairs, 2)

    adapter = load_adapter(blip2_world["runs"]["s1"])
    q = adapter.model
    tok = adapter.tokenizer(texts, padding=True, return_tensors="pt")
    assert torch.equal(tok.input_ids, inputs["input_ids"][:, N_PROMPT:])  # after the image tokens
    pixels = inputs["pixel_values"]
    encoder = load_vision_encoder(adapter.features_producer["encoder"])
    with torch.no_grad():
        visual = encoder(pixels)
        image_feat = F.normalize(q.vision_proj(q.query_output(visual)), dim=-1)            # (I, Q, E)
        text_feat = F.normalize(q.text_proj(q.text_output(tok.input_ids, tok.attention_mask)[:, 0]), dim=-1)
        ours_itc = torch.einsum("iqe,te->itq", image_feat, text_feat).amax(-1)
        att = torch.cat([torch.ones(2, N_PROMPT, dtype=torch.long), tok.attention_mask], dim=1)
        joint = q.joint_output(tok.input_ids, visual, att)
        ours_itm = q.itm_head(joint[:, :N_PROMPT]).mean(1)
    assert_tells_apart(ours_itc[0], ours_itc[1], "two images' ITC scores", 1e-4)  # a misrouted image would show
    assert_tells_apart(ours_itm[0], ours_itm[1], "two pairs' ITM logits", 1e-4)
    torch.testing.assert_close(itc, ours_itc, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(itm, ours_itm, rtol=1e-4, atol=1e-5)


def test_other_encoders_export_the_adaptor_alone(tmp_path, world_vit):
    from blitext.export.adaptor import BlitextAdaptor

    run, features = world_vit
    out, kind = export_run(ExportConfig(run=str(run), out=str(tmp_path / "adaptor")))
    assert kind == "adaptor"
    loaded = BlitextAdaptor.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["vision_encoder"]["encoder"] and config["llm"]["name"] and config["end_of_text"] == "\n"
    adapter = load_adapter(run)
    visual, _ = FeatureCache(features).get_batch(FeatureCache(features).keys[:3])
    with torch.no_grad():
        ours = adapter.model.prompts(visual.float())
        assert torch.equal(loaded(visual.float()), ours)
    assert_tells_apart(ours[0], ours[1], "the adaptor's prompts for two images")


def test_refusals_are_one_line(tmp_path, blip2_world):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(BlitextError, match="not an empty folder"):
        export_run(ExportConfig(run=str(blip2_world["runs"]["s1"]), out=str(tmp_path / "full")))
    with pytest.raises(BlitextError, match="--format 'onnx'"):
        export_run(ExportConfig(run=str(blip2_world["runs"]["s1"]), out=str(tmp_path / "o"), format="onnx"))
    with pytest.raises(BlitextError, match="holds no adaptor checkpoint"):
        export_run(ExportConfig(run=str(tmp_path), out=str(tmp_path / "o")))


@pytest.fixture(scope="module")
def world_vit(tmp_path_factory, vision_folders, llm_folders, bert_folder):
    root = tmp_path_factory.mktemp("export-vit")
    captions = write_images(root / "data", 8)
    features = root / "features"
    extract_features(ExtractConfig(data=str(captions), out=str(features), vision_encoder=str(vision_folders["vit"]),
                                   batch_size=4, shard_size=8, num_workers=0, device="cpu"))
    run = root / "s2"
    train_adapter(AdapterConfig(features=str(features), captions=[str(captions)], text_encoder=str(bert_folder),
                                llm=str(llm_folders["opt"]), stage=2, max_steps=2, batch_size=4, warmup_steps=1,
                                n_prompt=N_PROMPT, w_align=0.0, device="cpu", out=str(run)))
    return run, features
