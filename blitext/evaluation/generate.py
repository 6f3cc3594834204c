"""`blitext generate`: captions (or answers) for image files, folders, globs or a feature cache,
through the model `blitext.load` returns (blitext.evaluation.model), so the command and the Python
API write the same text; decoding settings are blitext.evaluation.decoding's.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

from blitext.data.images import load_image
from blitext.data.readers import IMAGE_EXTENSIONS, read_image_set
from blitext.errors import BlitextError
from blitext.evaluation import decoding
from blitext.evaluation.model import TrainedModel, load


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
    blank_start: bool | None = None     # may the first new token be whitespace alone (None: captions yes, answers no)
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
    decoding.require_settings(config.settings)
    refs = None if config.features else image_refs(config.images, config.limit)  # before any model loads
    model = load(config.adapter, config.device, config.llm, config.settings, config.batch_size,
                 vision=not config.features)
    options = dict(prompt=config.prompt, num_beams=config.num_beams, max_new_tokens=config.max_new_tokens,
                   min_new_tokens=config.min_new_tokens, length_penalty=config.length_penalty,
                   blank_start=config.blank_start)
    if config.features:
        return _generate_from_cache(config, model, options)
    results = []
    for start in range(0, len(refs), config.batch_size):
        batch = refs[start:start + config.batch_size]
        images = [load_image(r.root, r.ref, draft_size=model.draft_size) for r in batch]
        texts = model.answer(images, config.question, **options) if config.question else \
            model.caption(images, **options)
        results += [_result(r.id, config.question, text) for r, text in zip(batch, texts)]
    return results


def _generate_from_cache(config: GenerateConfig, model: TrainedModel, options: dict) -> list[dict]:
    """generate --features: the rows of a feature cache made by the adaptor's producer (a video's segments)."""
    from blitext.cache import FeatureCache

    cache = FeatureCache(config.features, expect=model.adapter.features_producer,
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
        texts = model.generate(features, mask, [config.question] * len(batch) if config.question else None, **options)
        results += [_result(i, config.question, text) for i, text in zip(batch, texts)]
    return results


def _result(image: str, question: str | None, text: str) -> dict:
    return {"image": image, **({"question": question} if question else {}), "text": text}
