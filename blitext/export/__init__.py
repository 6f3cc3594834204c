"""`blitext export RUN OUT`: a trained run as a folder other tools load.

- The run's vision encoder is BLIP-2's vision tower (`Blip2VisionModel`, the paper's EVA ViT-g):
  a stage-2 run becomes `Blip2ForConditionalGeneration` + `Blip2Processor`, a stage-1 run
  `Blip2ForImageTextRetrieval` (blitext.export.hf).
- Any other encoder, or a video run: the adaptor alone, as safetensors + config.json that
  `BlitextAdaptor.from_pretrained(OUT)` loads, naming the encoder and the LLM it needs
  (blitext.export.adaptor).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from blitext.atomic import check_out, fsync_tree, replace_folder, writing
from blitext.errors import BlitextError

FORMATS = ("hf",)


@dataclass
class ExportConfig:
    run: str = ""              # a train-adapter run (either stage, image or video), <run>/final or a checkpoint
    out: str = ""              # the folder to write (must not exist, or be empty)
    format: str = "hf"         # hf: transformers' BLIP-2 classes when the encoder is BLIP-2's, else the adaptor alone


def export_run(config: ExportConfig) -> tuple[Path, str]:
    """(the folder written, what it holds: the transformers class name or "adaptor")."""
    from blitext.export.adaptor import export_adaptor
    from blitext.export.hf import blip2_tower, export_blip2
    from blitext.models.adapter_checkpoint import load_adapter

    if config.format not in FORMATS:
        raise BlitextError(f"--format {config.format!r}: use hf (transformers' BLIP-2 classes, or the adaptor "
                           f"as safetensors + config)")
    check_out(config.out, "OUT")
    out = Path(config.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BlitextError(f"{out} already exists and is not an empty folder: pass a new OUT folder")
    adapter = load_adapter(config.run)
    tower = None if adapter.is_video else blip2_tower(adapter)
    kind, save = export_blip2(adapter, tower) if tower is not None else export_adaptor(adapter)
    tmp = out.with_name(f".{out.name}.tmp")  # written whole, then renamed: a killed export leaves no OUT
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(out.parent, then="run the same export again"):
        save(tmp)
        fsync_tree(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        replace_folder(tmp, out)
    return out, kind
