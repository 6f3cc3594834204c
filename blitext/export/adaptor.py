"""A run whose vision encoder is not BLIP-2's (or a video run) as the adaptor alone: safetensors +
config.json through huggingface_hub's PyTorchModelHubMixin, so

    from blitext.export.adaptor import BlitextAdaptor
    adaptor = BlitextAdaptor.from_pretrained(OUT)
    prompts = adaptor(features)          # visual tokens (B, T, D) -> soft prompts (B, n_prompt, d_llm)

The config names the vision encoder (with its fingerprint and preprocessing) and the LLM the
prompts are for, the end-of-text marker and the run's caption settings: what a user needs to
run it elsewhere.
"""
from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from blitext.atomic import write_json
from blitext.models.adapter_checkpoint import LoadedAdapter
from blitext.models.qformer import QFormer
from blitext.models.video_adapter import VideoAdapter


class BlitextAdaptor(nn.Module, PyTorchModelHubMixin, library_name="blitext"):
    """A blitext adaptor (the image Q-Former or the video Transformer) rebuilt from its description."""

    def __init__(self, description: dict, vision_encoder: dict, llm: dict, end_of_text: str = "\n",
                 generation: dict | None = None):
        super().__init__()
        kind = VideoAdapter if "video_adapter" in description else QFormer
        self.adaptor = kind.from_description(description)
        self.vision_encoder, self.llm, self.end_of_text, self.generation = vision_encoder, llm, end_of_text, generation

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.adaptor.prompts(features, mask)


def export_adaptor(adapter: LoadedAdapter):
    """("adaptor", a function writing safetensors, config.json and blitext_run.json into a folder)."""
    state = adapter.state
    model = BlitextAdaptor(description=adapter.model.describe(), vision_encoder=adapter.features_producer,
                           llm={"name": adapter.llm_name, "fingerprint": state["llm_fingerprint"]},
                           end_of_text=adapter.end_of_text, generation=state.get("generation"))
    model.adaptor.load_state_dict(adapter.model.state_dict())

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        write_json(folder / "blitext_run.json", {"run": str(adapter.path), "stage": adapter.stage,
                                                 "adapter_fingerprint": adapter.fingerprint,
                                                 "provenance": state.get("provenance")})
    return "adaptor", save
