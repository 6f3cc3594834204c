"""Shared fixtures: an isolated cache root, and tiny real transformers models saved to folders.

Tiny models are built from small random configs and saved with save_pretrained, then
loaded through the same path users use (a folder name given to --vision-encoder / --llm).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def cache_root(tmp_path_factory, monkeypatch) -> Path:
    """Every test writes artifacts into its own cache root, never the repo's cache/."""
    root = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("BLITEXT_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """A cache root shared by slow tests that convert the bundled LLM once."""
    return tmp_path_factory.mktemp("session-cache")


VISION_KINDS = ["clip", "clip-full", "siglip", "vit", "blip2", "blip2-full"]


def make_vision_folder(kind: str, folder: Path, image_size: int = 32) -> Path:
    """Save a tiny random vision tower (or full multimodal model) in the real checkpoint layout."""
    import transformers as tf

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8)
    if kind == "clip":
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(**common))
    elif kind == "clip-full":
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99)
        model = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=common, projection_dim=16))
    elif kind == "siglip":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**common))
    elif kind == "vit":
        model = tf.ViTModel(tf.ViTConfig(**common), add_pooling_layer=False)
    elif kind == "blip2":
        model = tf.Blip2VisionModel(tf.Blip2VisionConfig(**common))
    elif kind == "blip2-full":
        qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=99, encoder_hidden_size=32)
        text = dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
                    word_embed_proj_dim=32, max_position_embeddings=64)
        config = tf.Blip2Config(vision_config=common, qformer_config=qformer,
                                text_config=tf.OPTConfig(**text), num_query_tokens=4)
        model = tf.Blip2ForConditionalGeneration(config)
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def vision_folders(tmp_path_factory) -> dict[str, Path]:
    import torch

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("vision")
    return {kind: make_vision_folder(kind, root / kind) for kind in VISION_KINDS}


def make_tokenizer(folder: Path):
    """A small real byte-level BPE tokenizer trained on a few sentences, saved like a hub one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a red circle", "a blue square moves left", "two dogs play\n"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(folder)
    return fast


LLM_KINDS = ["opt", "llama", "gpt2"]


def make_llm_folder(kind: str, folder: Path) -> Path:
    import transformers as tf

    tokenizer = make_tokenizer(folder)
    vocab = max(len(tokenizer), 300)
    if kind == "opt":
        config = tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              vocab_size=vocab, word_embed_proj_dim=32, max_position_embeddings=128)
    elif kind == "llama":
        config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128)
    elif kind == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab, n_positions=128)
    else:
        raise ValueError(kind)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llm_folders(tmp_path_factory) -> dict[str, Path]:
    import torch

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("llm")
    return {kind: make_llm_folder(kind, root / kind) for kind in LLM_KINDS}


BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "moves",
              "left", "right", "two", "dogs", "play", "in", "the", "grass", "photo", "of", ".", ",", "##s"]


def make_bert_folder(folder: Path, vocab_size: int = 100) -> Path:
    """A tiny random BertModel (hidden 32, 2 layers, 4 heads) with a real WordPiece tokenizer."""
    import transformers as tf

    folder.mkdir(parents=True, exist_ok=True)
    # transformers 5 builds a BERT tokenizer from a vocab dict (vocab_file= is ignored); it writes vocab.txt
    tf.BertTokenizer(vocab={word: i for i, word in enumerate(BERT_WORDS)}).save_pretrained(folder)
    config = tf.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    tf.BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    return make_bert_folder(tmp_path_factory.mktemp("bert") / "bert")
