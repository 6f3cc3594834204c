"""`blitext demo`: the main job on the embedded default, one phase after another.

Each phase reuses its finished artifact, so re-running is cheap. For now: prepare
easy-VQA and cache its EfficientNet-Lite0 features; later phases add P-Former training,
adaptor training and evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass

from blitext.config import default_cache_root
from blitext.console import say
from blitext.data.prepare import prepare_dataset
from blitext.extract import ExtractConfig, extract_features


@dataclass
class DemoConfig:
    images_per_split: int = 500   # easy-VQA train and test images used (4,000 / 1,000 exist); CPU-sized


def run_demo(config: DemoConfig) -> dict:
    say("[bold]1/2 prepare easy-VQA[/] (real images and questions from the easy-vqa package)")
    folder = prepare_dataset("easy-vqa", limit=config.images_per_split)
    say(f"[bold]2/2 extract features[/] with the bundled EfficientNet-Lite0 from {folder}")
    out = default_cache_root() / "features" / f"easy-vqa-{config.images_per_split}__efficientnet-lite0"
    return extract_features(ExtractConfig(data=str(folder), out=str(out)))
