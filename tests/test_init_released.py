"""--init from released BLIP-2 weights: a transformers folder (save_pretrained, the Salesforce/blip2-*
layout) or a LAVIS checkpoint, renamed onto blitext's Q-Former; what a stage needs must be there."""
from __future__ import annotations

import argparse
import json
import pytest
import torch
from safetensors.torch import load_file

from blitext.adapter.image import AdapterConfig, train_adapter
from blitext.errors import BlitextError
from blitext.export import ExportConfig, export_run
from adapter_world import N_PROMPT
from test_export import blip2_world  # noqa: F401

FROZEN_LR = dict(lr=0.0, min_lr=0.0, warmup_start_lr=0.0, weight_decay=0.0)  # the start weights come out unchanged


def run_from(world, out, init, stage, **kw):  # noqa: F811
    """A one-step run at rate 0 from `init`: its final weights are the ones it started from."""
    llm_name = json.loads((world["runs"]["opt"] / "final" / "state.json").read_text())["config"]["llm"]
    values = dict(features=str(world["features"]), captions=[str(world["captions"])],
                  text_encoder=str(world["root"] / "bert"), llm=llm_name, stage=stage, max_steps=1, batch_size=4,
                  warmup_steps=1, n_prompt=N_PROMPT, w_align=0.0, device="cpu", embed_dim=16, init=str(init),
                  out=str(out), **FROZEN_LR)
    train_adapter(AdapterConfig(**{**values, **kw}))
    return load_file(out / "final" / "model.safetensors")


def same(a: dict, b: dict, keys) -> list[str]:
    return [k for k in keys if not torch.equal(a[k], b[k])]


def lavis_name(name: str) -> str:
    """blitext -> LAVIS, written out independently of blitext.models.blip2_layout."""
    if name.startswith("llm_proj."):
        return "opt_proj." + name.split(".", 1)[1]
    if name.startswith("qformer.layernorm."):
        return "Qformer.bert.embeddings.LayerNorm." + name.rsplit(".", 1)[1]
    if name.startswith("embeddings."):
        return "Qformer.bert." + name
    if name.startswith("qformer.encoder."):
        return "Qformer.bert." + name[len("qformer."):].replace("attention.attention.", "attention.self.")
    if name.startswith("lm_transform."):
        return "Qformer.cls.predictions.transform." + name[len("lm_transform."):]
    if name == "lm_bias":
        return "Qformer.cls.predictions.bias"
    return name  # query_tokens, vision_proj, text_proj, itm_head, temp


def test_stage1_starts_from_a_retrieval_folder_and_stage2_from_a_generation_folder(tmp_path, blip2_world):  # noqa: F811
    s1 = load_file(blip2_world["runs"]["s1"] / "final" / "model.safetensors")
    itm, _ = export_run(ExportConfig(run=str(blip2_world["runs"]["s1"]), out=str(tmp_path / "itm")))
    got = run_from(blip2_world, tmp_path / "from-itm", itm, stage=1)
    transformers_has = [k for k in s1 if not k.startswith(("lm_transform.", "lm_bias", "temp", "llm_proj."))]
    assert same(got, s1, transformers_has) == []

    s2 = load_file(blip2_world["runs"]["opt"] / "final" / "model.safetensors")
    gen, _ = export_run(ExportConfig(run=str(blip2_world["runs"]["opt"]), out=str(tmp_path / "gen")))
    got = run_from(blip2_world, tmp_path / "from-gen", gen, stage=2)
    query_path = [k for k in s2 if k.startswith(("query_tokens", "llm_proj.", "qformer.layernorm."))
                  or "_query." in k or ".attention." in k]
    assert len(query_path) > 10 and same(got, s2, query_path) == []
    with pytest.raises(BlitextError, match="lacks the text branch"):  # a generation folder has none
        run_from(blip2_world, tmp_path / "bad", gen, stage=1)


def test_a_random_blip2_saved_with_save_pretrained_gives_its_query_path(tmp_path, blip2_world):  # noqa: F811
    import transformers as tf

    state = json.loads((blip2_world["runs"]["opt"] / "final" / "state.json").read_text())
    q = state["qformer_config"]
    torch.manual_seed(3)
    config = tf.Blip2Config(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, image_size=32, patch_size=8),
                            qformer_config={**q, "use_qformer_text_input": False},
                            text_config=tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                                     num_attention_heads=4, vocab_size=99, word_embed_proj_dim=32),
                            num_query_tokens=N_PROMPT)
    model = tf.Blip2ForConditionalGeneration(config)
    model.save_pretrained(tmp_path / "blip2")
    got = run_from(blip2_world, tmp_path / "from-random", tmp_path / "blip2", stage=2)
    theirs = model.state_dict()
    assert torch.equal(got["query_tokens"], theirs["query_tokens"])
    assert torch.equal(got["llm_proj.weight"], theirs["language_projection.weight"])
    layer = "qformer.encoder.layer.0.crossattention.attention.key.weight"
    assert torch.equal(got[layer], theirs[layer])
    assert torch.equal(got["qformer.encoder.layer.1.output_query.dense.weight"],
                       theirs["qformer.encoder.layer.1.output_query.dense.weight"])


def test_a_lavis_checkpoint_is_read_with_weights_only(tmp_path, blip2_world):  # noqa: F811
    s1 = load_file(blip2_world["runs"]["s1"] / "final" / "model.safetensors")
    lavis = {lavis_name(k): v for k, v in s1.items() if k != "llm_proj.weight" and k != "llm_proj.bias"}
    lavis["Qformer.cls.predictions.decoder.weight"] = s1["embeddings.word_embeddings.weight"]  # tied
    lavis["visual_encoder.blocks.0.attn.qkv.weight"] = torch.zeros(3)  # frozen parts: ignored
    lavis["ln_vision.weight"] = torch.zeros(3)
    torch.save({"model": lavis}, tmp_path / "blip2_pretrained.pth")
    got = run_from(blip2_world, tmp_path / "from-lavis", tmp_path / "blip2_pretrained.pth", stage=1)
    assert same(got, s1, [k for k in s1 if not k.startswith("llm_proj.")]) == []

    # LAVIS's training checkpoints also pickle their config objects; weights_only refuses those
    torch.save({"model": lavis, "config": argparse.Namespace(lr=1e-4)}, tmp_path / "pickled.pth")
    with pytest.raises(BlitextError, match="weights_only=True"):
        run_from(blip2_world, tmp_path / "from-pickle", tmp_path / "pickled.pth", stage=1)


def test_a_released_q_former_of_another_shape_is_refused(tmp_path, blip2_world):  # noqa: F811
    gen, _ = export_run(ExportConfig(run=str(blip2_world["runs"]["opt"]), out=str(tmp_path / "gen")))
    with pytest.raises(BlitextError, match="--n-prompt"):
        run_from(blip2_world, tmp_path / "other", gen, stage=2, n_prompt=N_PROMPT + 2)
