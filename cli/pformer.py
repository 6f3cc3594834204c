"""`blitext train-pformer`, `build-prompts` and `check-prompts`: the P-Former's commands (stage 0 and
its reference prompts), thin typer functions that cli/main.py registers in pipeline order."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from blitext.cli.cache import print_cache_summary
from blitext.cli.common import (AccumStepsOpt, ConfigOpt, GradCheckpointingOpt, PrecisionOpt, ReportToOpt, default_is,
                                 default_of, user_errors, write_out)
from blitext.errors import BlitextError
from blitext.pformer.train import PFormerConfig


@user_errors
def train_pformer_cmd(
    text: Optional[list[str]] = typer.Option(None, "--text", help="Sentence file (plain text, .jsonl, caption .json) or glob; repeat for several."),
    out: Optional[Path] = typer.Option(None, "--out", help=f"Run folder. {default_is('cache/runs/pformer/<llm>')}"),
    llm: Optional[str] = typer.Option(None, "--llm", help=f"Frozen LLM: bundled name, folder or HF id. {default_of(PFormerConfig, 'llm')}"),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help=f"BERT-family encoder to start from. {default_of(PFormerConfig, 'text_encoder')}"),
    n_prompt: Optional[int] = typer.Option(None, "--n-prompt", help="Soft prompts per sentence. " + default_of(PFormerConfig, "n_prompt")),
    contrast: Optional[str] = typer.Option(None, "--contrast", help=f"two-view (paper's SimCSE) | one-view (authors' code). {default_of(PFormerConfig, 'contrast')}"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=f"Global batch. {default_of(PFormerConfig, 'batch_size')}"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the text. " + default_of(PFormerConfig, "epochs")),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N steps (overrides --epochs)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (AdamW, cosine decay). " + default_of(PFormerConfig, "lr")),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warm-up steps. " + default_of(PFormerConfig, "warmup_steps")),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help="Clip the gradient norm (small batches). " + default_is("no clipping, as the paper")),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of initialisation, masks, sampling and dropout. " + default_of(PFormerConfig, "seed")),
    heldout: Optional[int] = typer.Option(None, "--heldout", help="Sentences held out (never trained on) to measure reconstruction. " + default_of(PFormerConfig, "heldout")),
    sample_every: Optional[int] = typer.Option(None, "--sample-every", help="Print held-out reconstructions every N steps. " + default_of(PFormerConfig, "sample_every")),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Save a checkpoint every N steps. " + default_of(PFormerConfig, "save_every")),
    bad_bytes: Optional[str] = typer.Option(None, "--bad-bytes", help=f"error | replace (undecodable text). {default_of(PFormerConfig, 'bad_bytes')}"),
    device: Optional[str] = typer.Option(None, "--device", help=f"auto | cpu | cuda | cuda:N. {default_of(PFormerConfig, 'device')}"),
    resume: Optional[str] = typer.Option(None, "--resume", help="latest, or a checkpoints/step-N folder."),
    report_to: Optional[list[str]] = ReportToOpt,
    precision: Optional[str] = PrecisionOpt,
    grad_checkpointing: Optional[bool] = GradCheckpointingOpt,
    accum_steps: Optional[int] = AccumStepsOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Stage 0: train the P-Former on text alone against a frozen LLM (resumable; runs under torchrun)."""
    from blitext.config import resolve_config
    from blitext.console import say
    from blitext.pformer.train import train_pformer

    cfg = resolve_config(PFormerConfig, config, text=text or None, out=out and str(out), llm=llm,
                         text_encoder=text_encoder, n_prompt=n_prompt, contrast=contrast, batch_size=batch_size,
                         epochs=epochs, max_steps=max_steps, lr=lr, warmup_steps=warmup_steps, seed=seed,
                         max_grad_norm=max_grad_norm, heldout=heldout, sample_every=sample_every, save_every=save_every, bad_bytes=bad_bytes,
                         device=device, resume=resume, report_to=report_to or None, precision=precision,
                         grad_checkpointing=grad_checkpointing, accum_steps=accum_steps)
    say(f"[green]P-Former written to[/] {train_pformer(cfg)}")


# ------------------------------------------------------------------ build-prompts
from blitext.pformer.prompts import BuildPromptsConfig  # noqa: E402


@user_errors
def build_prompts_cmd(
    pformer: Optional[Path] = typer.Option(None, "--pformer", help="train-pformer's run folder (or <run>/final, or a checkpoint)."),
    captions: Optional[list[str]] = typer.Option(None, "--captions", help="Caption files as train-adapter reads them (.json, captions.jsonl, .csv, .tar; ids <image_id>#k), or text files (ids <file>:<line>); repeatable."),
    out: Optional[Path] = typer.Option(None, "--out", help=f"Cache folder. {default_is('cache/prompts/<data>__<pformer>')}"),
    store: Optional[str] = typer.Option(None, "--store", help=f"compact ([CLS] + head) | full (prompts). {default_of(BuildPromptsConfig, 'store')}"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Captions per P-Former forward. " + default_of(BuildPromptsConfig, "batch_size")),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Captions per shard. " + default_of(BuildPromptsConfig, "shard_size")),
    device: Optional[str] = typer.Option(None, "--device", help=f"auto | cpu | cuda | cuda:N. {default_of(BuildPromptsConfig, 'device')}"),
    config: Optional[Path] = ConfigOpt,
):
    """Cache the P-Former's reference prompt of every caption (resumable; runs under torchrun)."""
    from blitext.config import resolve_config
    from blitext.distributed import dist_info
    from blitext.pformer.prompts import build_prompts

    cfg = resolve_config(BuildPromptsConfig, config, pformer=pformer and str(pformer), captions=captions or None,
                         out=out and str(out), store=store, batch_size=batch_size, shard_size=shard_size, device=device)
    summary = build_prompts(cfg)
    if dist_info().is_main:
        print_cache_summary(summary)


# ------------------------------------------------------------------ check-prompts
@user_errors
def check_prompts_cmd(
    pformer: Optional[Path] = typer.Option(None, "--pformer", help="A P-Former run (with --captions)."),
    captions: Optional[list[str]] = typer.Option(None, "--captions", help="Captions to run the P-Former on."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="A prompt cache made by build-prompts."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A train-adapter run (with --features): the adaptor's prompts."),
    features: Optional[Path] = typer.Option(None, "--features", help="Feature cache to run the adaptor on."),
    llm: Optional[str] = typer.Option(None, "--llm", help=f"The LLM whose embeddings to compare with. {default_is('the one the prompts were made for')}"),
    limit: int = typer.Option(256, "--limit", help="Examples to check."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help=f"L2 distance counted as 'at a token'. {default_is('median nearest-neighbour distance between embedding rows')}"),
    k: int = typer.Option(3, "--k", help="Nearest tokens shown per slot."),
    examples: int = typer.Option(3, "--examples", help="Examples whose slots are decoded."),
    backend: str = typer.Option("auto", "--backend", help="auto | faiss | torch (nearest-row search)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the report as JSON here."),
):
    """How close prompts (a P-Former's, a prompt cache's or an adaptor's) sit to the LLM's token embeddings."""
    import dataclasses
    import json

    from blitext.pformer.check import check_prompts, format_report
    from blitext.console import console
    from blitext.models.loading import load_llm
    from blitext.pformer.prompts import prompts_from_cache, prompts_from_pformer

    sources = [x is not None for x in (pformer, prompts, adapter)]
    if sum(sources) != 1 or (pformer is not None and not captions) or (adapter is not None and features is None):
        raise BlitextError("give one of: --pformer RUN with --captions FILE, --prompts CACHE, "
                           "or --adapter RUN with --features CACHE")
    if pformer is not None:
        ids, vectors, llm_name = prompts_from_pformer(pformer, captions, limit)
    elif prompts is not None:
        ids, vectors, llm_name = prompts_from_cache(prompts, limit)
    else:
        from blitext.models.adapter_checkpoint import prompts_from_adapter

        ids, vectors, llm_name = prompts_from_adapter(adapter, features, limit)
    model = load_llm(llm or llm_name)
    report = check_prompts(vectors, model.embedding_table, model.tokenizer, ids, threshold, k, examples, backend)
    console.print(format_report(report), highlight=False, markup=False)
    if out:
        write_out(out, json.dumps(dataclasses.asdict(report), indent=1))
