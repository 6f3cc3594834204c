"""A run on BLIP-2's vision tower as transformers' own BLIP-2 classes (docs/method.md#export-to-transformers).

Stage 2 -> `Blip2ForConditionalGeneration` (+ `Blip2Processor`): the vision tower the features
came from, the Q-Former's query path, `llm_proj` as `language_projection`, and the frozen LLM.
Its `generate` on the processor's inputs writes the token ids `blitext generate` writes:
- the processor puts `num_query_tokens` image tokens first, then the text prompt; the image token
  is added to the LLM's vocabulary (the embeddings grow when it needs a new row, and that row is
  suppressed in generation: blitext's LLM has no such token to write);
- blitext reads no BOS after the prompts, so the tokenizer is saved without adding one (pass
  `text=""` for a caption: with no text the model itself puts a BOS after the image tokens);
- the run's end of text ("\\n") and the EOS stop generation, and the run's caption settings are
  the generation config's defaults.
Stage 1 -> `Blip2ForImageTextRetrieval`: the Q-Former with its text branch, ITC projections and ITM
head (its processor's tokenizer is the Q-Former's).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from blitext.console import say
from blitext.errors import BlitextError
from blitext.evaluation.decoding import GenerationSettings, trained_settings
from blitext.models.adapter_checkpoint import LoadedAdapter, load_llm_for_generation
from blitext.models.blip2_layout import to_hf
from blitext.models.loading import load_vision_encoder
from blitext.models.qformer import text_ffn

IMAGE_TOKEN = "<image>"


def blip2_tower(adapter: LoadedAdapter):
    """The run's vision encoder when it is BLIP-2's vision tower, else None."""
    from transformers import Blip2VisionModel

    encoder = load_vision_encoder(adapter.features_producer["encoder"])
    return encoder if isinstance(getattr(encoder, "tower", None), Blip2VisionModel) else None


def export_blip2(adapter: LoadedAdapter, encoder):
    """(the transformers class name, a function writing the model and its processor into a folder)."""
    build = conditional_generation if adapter.stage == 2 else retrieval
    model, processor = build(adapter, encoder)

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return type(model).__name__, save


def image_processor(preprocess):
    """BlipImageProcessor doing what the run's encoder did to every training image."""
    from transformers import BlipImageProcessor

    if preprocess.crop is not None or not isinstance(preprocess.resize, tuple):
        raise BlitextError("the run's vision encoder resizes then crops; BLIP-2's image processor resizes to a fixed "
                           "size only: export with --format hf needs BLIP-2's own preprocessing")
    h, w = preprocess.resize
    return BlipImageProcessor(do_resize=True, size={"height": h, "width": w}, resample=preprocess.resample,
                              do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                              image_mean=list(preprocess.mean), image_std=list(preprocess.std), do_convert_rgb=True)


def qformer_weights(adapter: LoadedAdapter, keep_text: bool) -> dict[str, torch.Tensor]:
    """The adaptor's weights under transformers' names (the text branch only when `keep_text`)."""
    out = {}
    for name, tensor in adapter.model.state_dict().items():
        hf = to_hf(name)
        if hf is None or (not keep_text and _text_branch(hf)):
            continue
        out[hf] = tensor.detach().clone()
    return out


def _text_branch(hf_name: str) -> bool:
    """Weights only the text side uses: the word embeddings, the text feed-forward, ITC/ITM heads."""
    return hf_name.startswith(("embeddings.", "vision_projection.", "text_projection.", "itm_head.")) or \
        text_ffn(hf_name)


def conditional_generation(adapter: LoadedAdapter, encoder):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    llm = load_llm_for_generation(adapter, None, "cpu")
    tokenizer = copy.deepcopy(llm.tokenizer)
    _without_bos(tokenizer)
    processor = Blip2Processor(image_processor(encoder.preprocess), tokenizer, num_query_tokens=adapter.model.n_prompt)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = llm.embedding_table.shape[0]
    suppress = []
    if image_id >= rows:  # the token needs a row of its own; nothing may ever write it
        llm.model.resize_token_embeddings(image_id + 1)
        suppress = list(range(rows, image_id + 1))
    qcfg = _qformer_config(adapter, text=False)
    config = Blip2Config(vision_config=encoder.tower.config.to_dict(), qformer_config=qcfg.to_dict(),
                         text_config=llm.model.config.to_dict(), num_query_tokens=adapter.model.n_prompt,
                         image_token_index=image_id)
    model = _assemble(Blip2ForConditionalGeneration, config, encoder, adapter, keep_text=False)
    model.language_model = llm.model
    _generation_defaults(model, adapter, llm, suppress)
    return model.eval(), processor


def retrieval(adapter: LoadedAdapter, encoder):
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor

    if adapter.tokenizer is None:
        raise BlitextError(f"{adapter.path} has no Q-Former tokenizer (tokenizer/): it cannot be exported for retrieval")
    tokenizer = copy.deepcopy(adapter.tokenizer)
    # as Salesforce/blip2-itm-vit-g: the processor puts image tokens first, the model drops them again
    processor = Blip2Processor(image_processor(encoder.preprocess), tokenizer, num_query_tokens=adapter.model.n_prompt)
    qcfg = _qformer_config(adapter, text=True)
    config = Blip2Config(vision_config=encoder.tower.config.to_dict(), qformer_config=qcfg.to_dict(),
                         num_query_tokens=adapter.model.n_prompt,
                         image_text_hidden_size=adapter.model.vision_proj.out_features,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    model = _assemble(Blip2ForImageTextRetrieval, config, encoder, adapter, keep_text=True)
    return model.eval(), processor


def _qformer_config(adapter: LoadedAdapter, text: bool):
    qcfg = copy.deepcopy(adapter.model.config)
    qcfg.use_qformer_text_input = text
    qcfg.encoder_hidden_size = adapter.model.qformer.config.encoder_hidden_size
    return qcfg


def _assemble(cls, config, encoder, adapter: LoadedAdapter, keep_text: bool):
    """The transformers model built on the meta device (no second copy of a multi-GB LLM), then
    given its real parts: the vision tower as loaded and the adaptor's weights, loaded so that
    every adaptor weight of the class comes from the run."""
    with torch.device("meta"):
        model = cls(config)
    model.vision_model = encoder.tower
    weights = qformer_weights(adapter, keep_text)
    for name, module in list(model.named_children()):
        if name in ("vision_model", "language_model"):
            continue
        fresh = _fresh(name, module, config)
        _load_exactly(fresh, {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}, name)
        setattr(model, name, fresh)
    model.query_tokens = nn.Parameter(weights["query_tokens"])
    return model


def _fresh(name: str, module: nn.Module, config) -> nn.Module:
    from transformers import Blip2QFormerModel
    from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

    if name == "qformer":
        return Blip2QFormerModel(config.qformer_config)
    if name == "embeddings":
        return Blip2TextEmbeddings(config.qformer_config)
    if isinstance(module, nn.Linear):
        return nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    raise BlitextError(f"transformers' {type(module).__name__} {name!r} has no blitext counterpart; this "
                       f"transformers version's BLIP-2 is not one blitext knows how to fill")


def _load_exactly(module: nn.Module, weights: dict, name: str) -> None:
    missing, unexpected = module.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise BlitextError(f"the run's Q-Former does not fill transformers' {name}: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")


def _without_bos(tokenizer) -> None:
    """blitext's LLM reads [soft prompts][text] with no BOS: save a tokenizer that adds none."""
    if tokenizer.bos_token_id is None:
        return
    if getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False
    probe = tokenizer("a").input_ids
    if probe and probe[0] == tokenizer.bos_token_id:
        say(f"[yellow]note:[/] this LLM's tokenizer adds BOS ({tokenizer.bos_token!r}) that blitext never "
            f"read; tokenize the text prompt with add_special_tokens=False to get blitext's captions")


def _generation_defaults(model, adapter: LoadedAdapter, llm, suppress: list[int]) -> None:
    """The run's caption settings and stop tokens as the generation config's defaults."""
    settings = GenerationSettings.for_task("caption", trained_settings(adapter, "run"))
    g = model.generation_config
    g.num_beams, g.max_new_tokens, g.min_new_tokens = settings.num_beams, settings.max_new_tokens, settings.min_new_tokens
    g.length_penalty, g.do_sample = settings.length_penalty, False
    g.eos_token_id = llm.stop_token_ids(adapter.end_of_text)
    g.pad_token_id = llm.tokenizer.pad_token_id
    g.suppress_tokens = suppress or None
    if llm.model.config.is_encoder_decoder:
        g.decoder_start_token_id = llm.model.config.decoder_start_token_id
