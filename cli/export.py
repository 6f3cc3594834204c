"""`blitext export RUN OUT`: a thin typer command over blitext.export (cli/main.py registers it)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from blitext.cli.common import default_of, user_errors
from blitext.export import ExportConfig


@user_errors
def export_cmd(
    run: Path = typer.Argument(..., help="A train-adapter run (stage 1 or 2, image or video), <run>/final or a checkpoint."),
    out: Path = typer.Argument(..., help="The folder to write (new, or empty)."),
    format: Optional[str] = typer.Option(None, "--format", help="hf: transformers' Blip2ForConditionalGeneration (stage 2) or Blip2ForImageTextRetrieval (stage 1) when the run's encoder is BLIP-2's vision tower; otherwise the adaptor as safetensors + config (BlitextAdaptor.from_pretrained). " + default_of(ExportConfig, "format")),
):
    """Write a trained run as a folder transformers (or huggingface_hub) loads with from_pretrained."""
    from blitext.config import resolve_config
    from blitext.console import say
    from blitext.export import export_run

    folder, kind = export_run(resolve_config(ExportConfig, None, run=str(run), out=str(out), format=format))
    how = ("blitext.export.adaptor.BlitextAdaptor.from_pretrained" if kind == "adaptor"
           else f"transformers.{kind}.from_pretrained (with Blip2Processor.from_pretrained)")
    say(f"[green]wrote[/] {folder}: load it with {how}")
