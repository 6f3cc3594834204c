"""Frozen image encoders that return all patch tokens, each with its own preprocessing.

Follows BLIP-2's use of the frozen encoder: the adaptor cross-attends to every output token
(257 x 1408 for EVA ViT-g/14 at 224 px; 49 x 1280 for the bundled EfficientNet-Lite0).
Preprocessing is written here rather than taken from transformers' image processors because
their fast versions need torchvision, which does not import beside the CPU torch wheel; the
slow ones' semantics (resize, centre crop, rescale, normalise) are reproduced from the
model's own preprocessor_config.json and recorded in every cache.
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from blitext.data.images import DECODING
from blitext.errors import BlitextError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Preprocess:
    """Resize (shortest edge or exact), optional centre crop, scale to [0, 1], normalise."""

    resize: tuple[int, int] | int    # int: shortest edge; (h, w): exact size
    crop: tuple[int, int] | None     # centre crop (h, w) after resizing
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = Image.BICUBIC

    @property
    def out_size(self) -> tuple[int, int]:
        return self.crop or (self.resize if isinstance(self.resize, tuple) else (self.resize, self.resize))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalise(self.pixels(image))

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The resized, cropped image as uint8 (3, H, W): what extract-features' workers send, a
        quarter of float32's bytes, leaving the arithmetic to the encoder's device."""
        image = self._resized(image.convert("RGB"))
        if self.crop:
            image = _centre_crop(image, self.crop)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) pixels -> float32 scaled to [0, 1] and normalised, on their device.
        Every operand is a tensor on that device: CUDA multiplies by the reciprocal of a scalar
        divisor, which rounds differently from the division done on a CPU."""
        x = pixels.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        mean, std, scale = (torch.tensor(v, dtype=torch.float32, device=x.device).view(-1, 1, 1)
                            for v in (self.mean, self.std, (255.0,)))
        return x.div_(scale).sub_(mean).div_(std)  # in place: one float32 copy of the batch, not four

    @property
    def least_decoded_size(self) -> tuple[int, int]:
        """(w, h) a decoded image must cover for the resize to lose nothing it keeps now: where
        draft decoding (extract-features --decode draft) may stop."""
        if isinstance(self.resize, tuple):
            h, w = self.resize
            return w, h
        return self.resize, self.resize  # the shortest edge: both sides at least that

    def _resized(self, image: Image.Image) -> Image.Image:
        if isinstance(self.resize, tuple):
            h, w = self.resize
        else:
            scale = self.resize / min(image.size)
            w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        return image.resize((w, h), self.resample) if (w, h) != image.size else image

    def to_dict(self) -> dict:
        d = asdict(self)
        d["resize"] = list(self.resize) if isinstance(self.resize, tuple) else self.resize
        d["crop"] = list(self.crop) if self.crop else None
        return d


def _centre_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    h, w = size
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return image.crop((left, top, left + w, top + h))


class VisionEncoder(nn.Module):
    """Base: `preprocess` runs in DataLoader workers, `forward` maps (B, 3, H, W) -> (B, T, D)."""

    name: str
    fingerprint: str
    preprocess: Preprocess

    def producer(self) -> dict:
        """What a feature cache records about its maker; caches are refused when this differs."""
        return {"encoder": self.name, "fingerprint": self.fingerprint, "decoding": DECODING,
                "preprocessing": self.preprocess.to_dict()}

    @torch.inference_mode()
    def token_shape(self) -> tuple[int, int]:
        """(T, D) of one image's features, from one dummy forward."""
        h, w = self.preprocess.out_size
        p = next(self.parameters())
        return tuple(self(torch.zeros(1, 3, h, w, device=p.device, dtype=p.dtype)).shape[1:])


class EfficientNetLiteEncoder(VisionEncoder):
    """EfficientNet-Lite0's last feature map (1280 x 7 x 7 at 224 px) as 49 tokens."""

    def __init__(self, weights: Path, name: str, fingerprint: str):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
            self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
        # Depthwise convolutions run about 2x faster on CPU in channels-last layout (measured here).
        self.net.to(memory_format=torch.channels_last)
        self.name, self.fingerprint = name, fingerprint
        # The Lite models were trained on (x - 127) / 128; ImageNet mean/std lowers its accuracy
        # (espresso photo: 0.95 vs 0.78).
        self.preprocess = Preprocess(resize=224, crop=(224, 224), mean=(127 / 255,) * 3, std=(128 / 255,) * 3)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.net.extract_features(pixels.contiguous(memory_format=torch.channels_last))  # (B, 1280, 7, 7)
        return fmap.flatten(2).transpose(1, 2)           # (B, 49, 1280)


def _tower_classes() -> dict[str, type]:
    from transformers import Blip2VisionModel, CLIPVisionModel, Dinov2Model, SiglipVisionModel, ViTModel

    return {
        "clip_vision_model": CLIPVisionModel,
        "siglip_vision_model": SiglipVisionModel,
        "blip_2_vision_model": Blip2VisionModel,
        "vit": ViTModel,
        "dinov2": Dinov2Model,
    }


# Full multimodal checkpoints whose vision tower is used alone: config key and weight prefix.
COMPOSITES = {"clip": "vision_model.", "siglip": "vision_model.", "blip-2": "vision_model."}


class HFVisionEncoder(VisionEncoder):
    """A transformers vision tower (CLIP, SigLIP, ViT, DINOv2, BLIP-2's EVA ViT-g): all output tokens."""

    def __init__(self, tower: nn.Module, preprocess: Preprocess, name: str, fingerprint: str):
        super().__init__()
        self.tower, self.preprocess = tower, preprocess
        self.name, self.fingerprint = name, fingerprint

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tower(pixel_values=pixels).last_hidden_state   # (B, T, D), T = 1 + patches

    @classmethod
    def from_folder(cls, path: Path, name: str, fingerprint: str) -> "HFVisionEncoder":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        towers = _tower_classes()
        if config.model_type in towers:
            kwargs = {"add_pooling_layer": False} if config.model_type in ("vit",) else {}
            tower = towers[config.model_type].from_pretrained(path, local_files_only=True, **kwargs)
            vision_config = config
        elif config.model_type in COMPOSITES:
            vision_config = config.vision_config
            tower = towers[vision_config.model_type](vision_config)
            _load_prefixed(tower, path, COMPOSITES[config.model_type])
        else:
            raise BlitextError(
                f"vision encoder {name!r} has model_type {config.model_type!r}; supported: "
                f"{sorted(towers) + sorted(COMPOSITES)} (or the bundled efficientnet-lite0)"
            )
        return cls(tower, preprocess_for(path, config.model_type, vision_config), name, fingerprint)


def _load_prefixed(module: nn.Module, path: Path, prefix: str) -> None:
    """Load only `prefix*` tensors of a composite checkpoint (no need to read a whole BLIP-2's LLM)."""
    from blitext.checkpoint import folder_tensors

    state = folder_tensors(path, lambda k: k.startswith(prefix), lambda k: k[len(prefix):])
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing:
        raise BlitextError(f"{path}: vision weights missing for {missing[:3]}... (prefix {prefix!r}); is it a full checkpoint?")


def preprocess_for(path: Path, model_type: str, vision_config) -> Preprocess:
    """The model's preprocessing from its preprocessor_config.json, else its family's defaults."""
    size = getattr(vision_config, "image_size", 224)
    clip_stats = model_type in ("clip", "clip_vision_model", "blip-2", "blip_2_vision_model")
    mean, std = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) if clip_stats else (HALF, HALF)
    if model_type in ("clip", "clip_vision_model"):
        default = Preprocess(resize=size, crop=(size, size), mean=mean, std=std)
    else:
        default = Preprocess(resize=(size, size), crop=None, mean=mean, std=std)
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return default
    cfg = json.loads(file.read_text())
    return Preprocess(
        resize=_resize_from(cfg.get("size"), default.resize) if cfg.get("do_resize", True) else default.resize,
        crop=_hw(cfg.get("crop_size")) if cfg.get("do_center_crop") else None,
        mean=tuple(cfg.get("image_mean", default.mean)),
        std=tuple(cfg.get("image_std", default.std)),
        resample=int(cfg.get("resample", Image.BICUBIC)),
    )


def _resize_from(size, fallback):
    if size is None:
        return fallback
    if isinstance(size, int):
        return size
    if "shortest_edge" in size:
        return int(size["shortest_edge"])
    return _hw(size)


def _hw(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    return (int(size["height"]), int(size["width"]))
