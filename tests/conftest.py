"""Shared fixtures: an isolated cache root, and tiny real transformers models saved to folders.

Tiny models are built from small random configs and saved with save_pretrained, then
loaded through the same path users use (a folder name given to --vision-encoder / --llm).

Every tiny model here must tell its inputs apart, or a test that compares two paths passes
whichever input each path was given. Random towers at transformers' default scales do not:
BLIP-2's vision config defaults to initializer_range 1e-10 (features ~1e-5, the same for any
image), and a BERT at std 0.02 attends almost uniformly (its [CLS] hardly depends on the text).
So the towers below use weights at a scale where outputs move with the input (initializer
range 0.02 for vision towers, 0.2 for the BERT and the LLMs, kaiming for I3D), and each
fixture asserts that two different inputs give outputs further apart than the tolerance the
tests compare with (`assert_tells_apart`).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The widest tolerance a test compares tiny-model outputs with (fp16 caches: 2e-3; --online's
# losses: 2e-2 relative): two different inputs must give outputs 10x further apart than this.
TOLERANCE = 2e-2
STD_VISION, STD_TEXT = 0.02, 0.2  # initializer ranges of the tiny vision towers and of the BERT and LLMs


def assert_tells_apart(a, b, what: str, tolerance: float = TOLERANCE) -> float:
    """The largest difference between two inputs' outputs; a fixture fails when it is not 10x the tolerance."""
    gap = float((a.float() - b.float()).abs().max())
    assert gap > 10 * tolerance, (f"{what}: two different inputs give outputs {gap:.2g} apart, not above 10x the "
                                  f"tests' tolerance {tolerance:g}; a test comparing two paths could not fail")
    return gap


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


# ---------------------------------------------------------------- vision towers

VISION_KINDS = ["clip", "clip-full", "siglip", "vit", "blip2", "blip2-full"]


def make_vision_folder(kind: str, folder: Path, image_size: int = 32) -> Path:
    """Save a tiny random vision tower (or full multimodal model) in the real checkpoint layout."""
    import transformers as tf

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8, initializer_range=STD_VISION)  # BLIP-2's default is 1e-10
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
                       vocab_size=99, encoder_hidden_size=32, initializer_range=STD_VISION)
        text = dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
                    word_embed_proj_dim=32, max_position_embeddings=64)
        config = tf.Blip2Config(vision_config=common, qformer_config=qformer, text_config=tf.OPTConfig(**text),
                                num_query_tokens=4, initializer_range=STD_VISION)
        model = tf.Blip2ForConditionalGeneration(config)
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    return folder


def assert_vision_tower_tells_images_apart(folder: Path, kind: str) -> None:
    """Two random images through the loader users get: their visual tokens must differ."""
    import torch

    from blitext.models.loading import load_vision_encoder

    encoder = load_vision_encoder(str(folder))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = encoder(pixels)
    assert_tells_apart(tokens[0], tokens[1], f"the tiny {kind} vision tower")


@pytest.fixture(scope="session")
def vision_folders(tmp_path_factory) -> dict[str, Path]:
    import torch

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("vision")
    folders = {kind: make_vision_folder(kind, root / kind) for kind in VISION_KINDS}
    for kind, folder in folders.items():
        assert_vision_tower_tells_images_apart(folder, kind)
    return folders


# ---------------------------------------------------------------- LLMs

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
    """A tiny random causal LM at std 0.2: at transformers' 0.02 its next token hardly depends on
    the prompts (trained prompts moved a tiny OPT's loss by 0.01 at 0.02, by 0.6 at 0.2)."""
    import transformers as tf

    tokenizer = make_tokenizer(folder)
    vocab = max(len(tokenizer), 300)
    if kind == "opt":
        config = tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              vocab_size=vocab, word_embed_proj_dim=32, max_position_embeddings=128, init_std=STD_TEXT)
    elif kind == "llama":
        config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                                initializer_range=STD_TEXT)
    elif kind == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab, n_positions=128,
                               initializer_range=STD_TEXT)
    else:
        raise ValueError(kind)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def assert_llm_tells_prompts_apart(folder: Path, kind: str) -> None:
    """Soft prompts at the Q-Former's scale: the next-token logits differ, and so does the greedy token."""
    import torch

    from blitext.models.loading import load_llm

    llm = load_llm(str(folder))
    prompts = torch.randn(4, 4, llm.model.get_input_embeddings().weight.shape[1],
                          generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = llm.model(inputs_embeds=prompts).logits[:, -1]
    assert_tells_apart(logits[0], logits[1], f"the tiny {kind} LLM")
    assert len(set(logits.argmax(-1).tolist())) > 1, f"the tiny {kind} LLM picks one next token for every prompt"


@pytest.fixture(scope="session")
def llm_folders(tmp_path_factory) -> dict[str, Path]:
    import torch

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("llm")
    folders = {kind: make_llm_folder(kind, root / kind) for kind in LLM_KINDS}
    for kind, folder in folders.items():
        assert_llm_tells_prompts_apart(folder, kind)
    return folders


# ---------------------------------------------------------------- BERT, and the Q-Former and P-Former built on it

BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "moves",
              "left", "right", "two", "dogs", "play", "in", "the", "grass", "photo", "of", ".", ",", "##s"]


def make_bert_folder(folder: Path, vocab_size: int = 100) -> Path:
    """A tiny random BertModel (hidden 32, 2 layers, 4 heads) with a real WordPiece tokenizer."""
    import transformers as tf

    folder.mkdir(parents=True, exist_ok=True)
    # transformers 5 builds a BERT tokenizer from a vocab dict (vocab_file= is ignored); it writes vocab.txt
    tf.BertTokenizer(vocab={word: i for i, word in enumerate(BERT_WORDS)}).save_pretrained(folder)
    # std 0.2: at 0.02 attention is near uniform and [CLS] hardly depends on the text (P-Former
    # prompts of two captions 7e-6 apart); the Q-Former's and P-Former's new layers follow this std
    config = tf.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, initializer_range=STD_TEXT)
    tf.BertModel(config).save_pretrained(folder)
    return folder


def tiny_qformer(bert: Path, vision_width: int, n_prompt: int = 4, d_llm: int = 32):
    """A Q-Former from the tiny BERT, as train-adapter builds it, in eval mode."""
    from blitext.models.loading import load_text_encoder
    from blitext.models.qformer import QFormer, qformer_tokenizer

    encoder = load_text_encoder(str(bert))
    return QFormer.from_text_encoder(encoder.model, qformer_tokenizer(encoder.tokenizer), vision_width, n_prompt,
                                     d_llm).eval()


def assert_adaptors_tell_inputs_apart(bert: Path) -> None:
    """The Q-Former's prompts for two random feature rows, and a P-Former's for two captions, differ."""
    import torch

    from blitext.models.loading import load_text_encoder
    from blitext.models.pformer import PFormer

    features = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(1))
    with torch.random.fork_rng(), torch.no_grad():  # the new layers' random init leaves the tests' RNG alone
        prompts = tiny_qformer(bert, 32).prompts(features)
    assert_tells_apart(prompts[0], prompts[1], "the tiny Q-Former")
    encoder = load_text_encoder(str(bert))
    tokens = encoder.tokenizer(["a red circle", "a blue circle"], padding=True, return_tensors="pt")
    with torch.random.fork_rng(), torch.no_grad():
        prompts = PFormer(encoder.model, d_llm=32, n_prompt=4).eval()(tokens.input_ids, tokens.attention_mask).prompts
    assert_tells_apart(prompts[0], prompts[1], "a P-Former on the tiny BERT")


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    folder = make_bert_folder(tmp_path_factory.mktemp("bert") / "bert")
    assert_adaptors_tell_inputs_apart(folder)
    return folder


# ---------------------------------------------------------------- I3D

def make_i3d_checkpoint(path: Path) -> Path:
    """Random I3D weights saved as pytorch-i3d saves rgb_imagenet.pt: kaiming-initialised
    convolutions (at PyTorch's default a 22-layer I3D gives every clip the same output, 2e-6
    apart) and random BatchNorm statistics."""
    import torch

    from blitext.models.i3d import InceptionI3d

    torch.manual_seed(0)
    net = InceptionI3d()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv3d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), path)
    net.eval()
    clips = torch.rand(2, 3, 16, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        feats = net.pooled(clips).mean(dim=(2, 3, 4))
    assert_tells_apart(feats[0], feats[1], "the random I3D")
    return path


@pytest.fixture(scope="session")
def i3d_checkpoint(tmp_path_factory) -> Path:
    return make_i3d_checkpoint(tmp_path_factory.mktemp("i3d") / "rgb_imagenet.pt")
