"""`blitext.load(run)`: a trained adaptor with its frozen LLM (and, for an image run, its vision
encoder), ready to caption images and answer questions about them.

    import blitext
    model = blitext.load("cache/runs/adapter/stage2-w100")
    model.caption(["cat.jpg", pil_image])           # -> ["a cat on a sofa", ...]
    model.answer("cat.jpg", "what colour is the cat?")

It runs the code `blitext generate` and `blitext eval` run (generate_texts, with the run's recorded
generation settings by default), so the three write the same text for the same image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from blitext.data.images import DRAFT_DECODING, load_image, to_rgb
from blitext.distributed import use_device
from blitext.errors import BlitextError
from blitext.evaluation import decoding
from blitext.evaluation.decoding import GenerationSettings, require_settings, trained_settings
from blitext.models.adapter_checkpoint import LoadedAdapter, adapter_encoder, load_adapter, load_llm_for_generation

ImageLike = Union[str, Path, Image.Image, torch.Tensor]
DECODING = ("prompt", "num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "blank_start")


def load(run: str | Path, device: str = "auto", llm: str | None = None, settings: str = "run",
         batch_size: int = 8, vision: bool = True) -> "TrainedModel":
    """A stage-2 image run or a video run (its folder, `<run>/final` or a checkpoint), in eval mode.

    settings: "run" (captions as the adaptor trained: its text prompt, none, and its captions'
    length) or "paper" (the paper's COCO settings: "a photo of", beam 5, 8..30 new tokens).
    vision=False skips the vision encoder: the model then reads visual tokens only (`generate`).
    """
    require_settings(settings)
    device = use_device(device)
    adapter = load_adapter(run, device)
    frozen_llm = load_llm_for_generation(adapter, llm, device)
    encoder = adapter_encoder(adapter, device) if vision and not adapter.is_video else None
    return TrainedModel(adapter, frozen_llm, encoder, settings, batch_size)


class TrainedModel:
    """Captions and answers from a trained adaptor; inputs go through in batches of `batch_size`.

    An image run takes images: PIL images, paths, or pixel tensors (3, H, W) / (B, 3, H, W), uint8
    or float in [0, 1]; they get the vision encoder's own preprocessing. A video run takes visual
    tokens from the encoder it was trained on: one (T, D) tensor per clip (clips may differ in T),
    or a (B, T, D) batch.
    """

    def __init__(self, adapter: LoadedAdapter, llm, encoder, settings: str = "run", batch_size: int = 8):
        self.adapter, self.llm, self.encoder, self.batch_size = adapter, llm, encoder, batch_size
        self.trained = trained_settings(adapter, settings)

    @property
    def device(self) -> str:
        return self.llm.device

    @property
    def draft_size(self) -> tuple[int, int] | None:
        """Where the adaptor's features were draft-decoded (extract-features --decode draft), image
        files are decoded the same way: the size to stop at; None for full decoding."""
        if self.encoder is None or DRAFT_DECODING not in self.adapter.features_producer.get("decoding", ""):
            return None
        return self.encoder.preprocess.least_decoded_size

    def settings(self, task: str, **options) -> GenerationSettings:
        """The decoding settings `caption` ("caption") or `answer` ("vqa") use, as `blitext generate`."""
        unknown = set(options) - set(DECODING)
        if unknown:
            raise BlitextError(f"unknown decoding option {sorted(unknown)[0]!r}; use {', '.join(DECODING)}")
        return GenerationSettings.for_task(task, self.trained, **options)

    def caption(self, images: ImageLike | Sequence[ImageLike], **options) -> str | list[str]:
        """One caption per image (a single image gives a single string)."""
        items, single = _as_list(images)
        texts = self._in_batches(items, None, options)
        return texts[0] if single else texts

    def answer(self, images: ImageLike | Sequence[ImageLike], questions: str | Sequence[str],
               **options) -> str | list[str]:
        """One short answer per image: one question for every image, or one question each."""
        items, single = _as_list(images)
        questions = [questions] * len(items) if isinstance(questions, str) else list(questions)
        if len(questions) != len(items):
            raise BlitextError(f"answer: {len(items)} images but {len(questions)} questions; pass one question "
                               f"for every image or one each")
        texts = self._in_batches(items, questions, options)
        return texts[0] if single else texts

    def generate(self, features: torch.Tensor, mask: torch.Tensor | None = None,
                 questions: list[str] | None = None, **options) -> list[str]:
        """Captions (or answers to `questions`) from visual tokens already encoded: (B, T, D) and a
        (B, T) mask for padded rows, as a feature cache holds them."""
        settings = self.settings("vqa" if questions else "caption", **options)
        texts = [settings.prompt.format(q) for q in questions] if questions else [settings.prompt] * len(features)
        # through the module: tests replace decoding.generate_texts to see what each path asks for
        return decoding.generate_texts(self.adapter, self.llm, features, mask, texts, settings)

    @torch.inference_mode()
    def visual_tokens(self, items: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, D) visual tokens and a (B, T) mask (None when every row is full) for a batch of inputs."""
        if self.adapter.is_video:
            return _stack_clips(items, self.adapter.features_producer, self.adapter.state["video_adapter"]["d_in"])
        if self.encoder is None:
            raise BlitextError("this model was loaded without its vision encoder (vision=False): pass visual "
                               "tokens to .generate, or load it again with vision=True")
        pixels = torch.stack([self.encoder.preprocess(_pil(item, self.draft_size)) for item in items])
        dtype = next(self.encoder.parameters()).dtype
        return self.encoder(pixels.to(self.device, dtype)), None

    def _in_batches(self, items: list, questions: list[str] | None, options: dict) -> list[str]:
        out = []
        for start in range(0, len(items), self.batch_size):
            features, mask = self.visual_tokens(items[start:start + self.batch_size])
            out += self.generate(features, mask, questions and questions[start:start + self.batch_size], **options)
        return out


def _as_list(images) -> tuple[list, bool]:
    """(the inputs as a list, whether one input was given); a 4-D tensor is a batch of images,
    a 3-D one a single image (or a video batch, which _stack_clips reads whole)."""
    if isinstance(images, (str, Path, Image.Image)):
        return [images], True
    if torch.is_tensor(images):
        return (list(images.unbind(0)), False) if images.dim() == 4 else ([images], True)
    items = list(images)
    if not items:
        raise BlitextError("no images given: pass an image, a path, a tensor, or a list of them")
    return items, False


def _pil(item, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """An RGB PIL image from a path (draft-decoded at `draft_size` if given), a PIL image or a
    (3, H, W) pixel tensor."""
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise BlitextError(f"{str(item)!r}: no such image file")
        return load_image(path.parent, path.name, draft_size=draft_size)
    if isinstance(item, Image.Image):
        return to_rgb(item, "image")
    if torch.is_tensor(item):
        if item.dim() != 3 or item.shape[0] not in (1, 3):
            raise BlitextError(f"an image tensor must be (3, H, W) or (B, 3, H, W) pixels; got {tuple(item.shape)}")
        pixels = item.detach().cpu()
        if pixels.dtype != torch.uint8:  # floats are [0, 1] pixels, as torchvision's ToTensor writes them
            pixels = (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return Image.fromarray(np.ascontiguousarray(pixels.expand(3, -1, -1).permute(1, 2, 0).numpy()), "RGB")
    raise BlitextError(f"cannot read an image from a {type(item).__name__}: pass a path, a PIL image or a tensor")


def _stack_clips(items: list, producer: dict, width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A video run's clips, (T_i, D) each or one (B, T, D) batch, zero-padded with a (B, T) mask."""
    if len(items) == 1 and torch.is_tensor(items[0]) and items[0].dim() == 3:
        items = list(items[0].unbind(0))
    if not all(torch.is_tensor(c) and c.dim() == 2 for c in items):
        raise BlitextError(f"a video run reads visual tokens from {producer.get('encoder', 'its encoder')}: pass "
                           f"one (T, D) tensor per clip or a (B, T, D) batch, not images")
    if any(c.shape[1] != width for c in items):
        raise BlitextError(f"clip tokens {sorted({c.shape[1] for c in items})} wide, but the adaptor reads {width}-wide "
                           f"tokens from {producer.get('encoder', 'its encoder')}: pass that encoder's features")
    longest = max(c.shape[0] for c in items)
    features = torch.zeros(len(items), longest, width)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for i, clip in enumerate(items):
        features[i, :clip.shape[0]], mask[i, :clip.shape[0]] = clip.float(), True
    return features, None if bool(mask.all()) else mask
