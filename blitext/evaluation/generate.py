"""`blitext generate`: captions (or answers) from a trained adaptor and its frozen LLM.

A causal LLM reads [left padding][the adaptor's soft prompts][the text prompt], an encoder-decoder
LLM's encoder [soft prompts][text prompt </s>] (LAVIS's blip2_t5), and writes with transformers'
generate (blitext.models.llm). Captions follow what the run trained on (no text prompt, its
captions' length; `--settings run`); otherwise, and with `--settings paper`, the defaults are
docs/method.md#generation-settings: captions with "a photo of", beam 5, 8..30 new tokens;
questions as "Question: {} Short answer:", beam 5, 1..10 new tokens, length penalty -1, for either family (LAVIS's T5 models use the same). Generation stops
at the end-of-text marker the adaptor was trained to emit ("\\n"; T5's </s>), which a small
chat-tuned LLM otherwise talks past.

`generate_texts` works on visual tokens from any source (an image, a feature cache), so the
evaluation commands share it; `generate_from_text` runs the same path with a text's embeddings
where the soft prompts go (eval vqa's text ceiling).
"""
from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

import torch

from blitext.models.adapter_checkpoint import LoadedAdapter, adapter_encoder, load_adapter, load_llm_for_generation
from blitext.data.images import load_image
from blitext.data.readers import IMAGE_EXTENSIONS, read_image_set
from blitext.distributed import pick_device
from blitext.errors import BlitextError
from blitext.models.llm import FrozenLLM

CAPTION_PROMPT = "a photo of"
VQA_PROMPT = "Question: {} Short answer:"


@dataclass
class GenerationSettings:
    """One task's decoding settings (docs/method.md#generation-settings by default)."""
    prompt: str = CAPTION_PROMPT       # "{}" is replaced by the question
    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 8
    length_penalty: float = 1.0

    @classmethod
    def for_task(cls, task: str, trained: dict | None = None, **overrides) -> "GenerationSettings":
        """The task's settings: captions follow what the run trained on (`trained`, the state's
        "generation" record: its text prompt, none, and its captions' token length) when given,
        else the paper's COCO settings; given overrides win."""
        base = cls(VQA_PROMPT, 5, 10, 1, -1.0) if task == "vqa" else cls()
        if task == "caption" and trained:
            longest = trained["caption_tokens_max"]
            base.prompt, base.min_new_tokens = trained["prompt"], 1
            base.max_new_tokens = longest + max(2, longest // 4)  # room for the end marker and a longer caption
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        return base


SETTINGS = ("run", "paper")  # captions: as the run trained (older runs: paper) | the paper's COCO settings


def trained_settings(adapter: LoadedAdapter, settings: str) -> dict | None:
    """The run's caption record for `settings` "run" (None for runs older than the record, or "paper")."""
    require_settings(settings)
    return adapter.state.get("generation") if settings == "run" else None


def require_settings(settings: str) -> None:
    if settings not in SETTINGS:
        raise BlitextError(f"--settings {settings!r}: use run (the prompt and caption length the adaptor trained "
                           f"with) or paper (\"a photo of\", beam 5, 8..30 tokens)")


@torch.inference_mode()
def generate_texts(adapter: LoadedAdapter, llm: FrozenLLM, features: torch.Tensor, feature_mask: torch.Tensor | None,
                   texts: list[str], settings: GenerationSettings) -> list[str]:
    """One generation per row of features (B, T, D); texts are the text prompts (questions filled in)."""
    device = llm.device
    prompts = adapter.model.prompts(features.to(device).float(), None if feature_mask is None else feature_mask.to(device))
    return generate_after(llm, prompts, texts, settings, adapter.end_of_text)


@torch.inference_mode()
def generate_from_text(llm: FrozenLLM, contexts: list[str], texts: list[str], settings: GenerationSettings,
                       end_of_text: str) -> list[str]:
    """generate_texts with a text in place of each row's soft prompts: the LLM's own embeddings of
    the context's tokens fill the prompts' slot, so padding, decoding and the stop marker are the
    adaptor's own (eval vqa's text ceiling: the caption as text instead of the image)."""
    return generate_after(llm, [llm.embed_text(context) for context in contexts], texts, settings, end_of_text)


@torch.inference_mode()
def generate_after(llm: FrozenLLM, prefixes: torch.Tensor | list[torch.Tensor], texts: list[str],
                   settings: GenerationSettings, end_of_text: str) -> list[str]:
    """Decode from each row's prefix embeddings (n_i, d) and its text prompt, as the LLM's family
    reads them (blitext.models.llm); the output is cut where the LLM stops."""
    return llm.generate(prefixes, texts, end_of_text, settings.max_new_tokens, num_beams=settings.num_beams,
                        min_new_tokens=settings.min_new_tokens, length_penalty=settings.length_penalty)


# ---------------------------------------------------------------- the command

@dataclass
class GenerateConfig:
    adapter: str = ""                  # train-adapter's run folder (stage 2), <run>/final or a checkpoint
    images: list[str] = field(default_factory=list)  # image files, folders, caption JSON or .tar shards
    features: str | None = None        # instead of images: a feature cache (video adaptors read only these)
    ids: list[str] = field(default_factory=list)  # with features: the rows to use; default every row
    question: str | None = None        # answer this question about every image (VQA settings)
    prompt: str | None = None          # text prompt; default: --settings' (VQA: "Question: {} Short answer:")
    settings: str = "run"              # captions: run (the adaptor's training prompt, none, and caption length;
                                       # runs older than that record: paper) | paper ("a photo of", 8..30 tokens)
    num_beams: int | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    length_penalty: float | None = None
    batch_size: int = 8
    limit: int | None = None           # only the first N images
    llm: str | None = None             # default: the LLM the adaptor was trained for
    device: str = "auto"


@dataclass
class ImageRef:
    id: str
    root: Path
    ref: str


def image_refs(inputs: list[str], limit: int | None) -> list[ImageRef]:
    """Image files as given or matched by a glob; anything else read as a dataset (folder,
    caption JSON, .tar shards or a glob of them)."""
    refs: list[ImageRef] = []
    for item in inputs:
        refs.extend(_refs_of(item))
    if not refs:
        raise BlitextError("generate needs images: pass --images FILE... (or a folder / caption JSON), or --features CACHE")
    return refs[:limit] if limit else refs


def _refs_of(item: str) -> list[ImageRef]:
    path = Path(item)
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        return [ImageRef(path.name, path.parent, path.name)]
    if not path.exists() and glob.has_magic(item):
        matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        if not matches:
            raise BlitextError(f"--images {item!r}: the glob matches no files; check the pattern")
        if all(p.suffix.lower() in IMAGE_EXTENSIONS for p in matches):
            return [ImageRef(p.name, p.parent, p.name) for p in matches]
    if path.exists() or glob.has_magic(item):
        image_set = read_image_set(item)
        return [ImageRef(r.id, image_set.root, r.image) for r in image_set.records]
    raise BlitextError(f"--images {item!r}: no such file or folder")


def run_generate(config: GenerateConfig) -> list[dict]:
    """[{"image", "question"?, "text"}] for every image, in order."""
    if not config.adapter:
        raise BlitextError("generate needs --adapter RUN (a train-adapter stage-2 run)")
    require_settings(config.settings)
    device = pick_device(config.device)
    adapter = load_adapter(config.adapter, device)
    llm = load_llm_for_generation(adapter, config.llm, device)
    task = "vqa" if config.question else "caption"
    settings = GenerationSettings.for_task(task, trained_settings(adapter, config.settings), prompt=config.prompt,
                                           num_beams=config.num_beams,
                                           max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
                                           length_penalty=config.length_penalty)
    text = settings.prompt.format(config.question) if config.question else settings.prompt
    if config.features:
        return _generate_from_cache(config, adapter, llm, settings, text)
    encoder = adapter_encoder(adapter, device)
    refs = image_refs(config.images, config.limit)
    results = []
    for start in range(0, len(refs), config.batch_size):
        batch = refs[start:start + config.batch_size]
        pixels = torch.stack([encoder.preprocess(load_image(r.root, r.ref)) for r in batch])
        with torch.inference_mode():
            features = encoder(pixels.to(device, next(encoder.parameters()).dtype))
        outputs = generate_texts(adapter, llm, features, None, [text] * len(batch), settings)
        for r, out in zip(batch, outputs):
            results.append(_result(r.id, config.question, out))
    return results


def _generate_from_cache(config: GenerateConfig, adapter: LoadedAdapter, llm, settings: GenerationSettings,
                         text: str) -> list[dict]:
    """generate --features: the rows of a feature cache made by the adaptor's producer (a video's segments)."""
    from blitext.cache import FeatureCache

    cache = FeatureCache(config.features, expect=adapter.features_producer,
                         fix="pass a feature cache made by the encoder the adaptor was trained on")
    ids = config.ids or cache.keys
    missing = [i for i in ids if i not in cache]
    if missing:
        raise BlitextError(f"--ids {missing[0]!r} is not in {config.features} ({len(missing)} missing): "
                           f"pass ids the cache holds (blitext cache info {config.features})")
    ids, results = ids[:config.limit] if config.limit else ids, []
    for start in range(0, len(ids), config.batch_size):
        batch = ids[start:start + config.batch_size]
        features, mask = cache.get_batch(batch)  # (B, T, D), (B, T) for variable-length rows
        outputs = generate_texts(adapter, llm, features, mask, [text] * len(batch), settings)
        results += [_result(i, config.question, out) for i, out in zip(batch, outputs)]
    return results


def _result(image: str, question: str | None, text: str) -> dict:
    return {"image": image, **({"question": question} if question else {}), "text": text}
