"""Checkpoints: trainable weights (safetensors) + optimizer + state, written atomically.

A checkpoint is a folder `checkpoints/step-0000100/` built under a temp name and renamed,
then `checkpoints/latest` (a one-line file) is replaced atomically: a kill at any moment
leaves the previous checkpoint intact and pointed to. Frozen models are never stored, only
their names and fingerprints (in `state.json`), so a resume with other weights is refused.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from blitext.atomic import publish, read_json, write_json
from blitext.cache.manifest import same_identity
from blitext.errors import BlitextError

LATEST = "latest"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that train (and buffers of trainable modules); frozen models are left out."""
    model = getattr(model, "module", model)  # unwrap DDP
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items() if n in names}


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict[str, Any], keep: int = 2, weights: dict[str, torch.Tensor] | None = None,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """`weights` replaces the trainable parameters as what is stored; `extra(folder)` writes
    more files (a tokenizer) into the checkpoint before it is published."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    final = ckpt_dir / f"step-{step:07d}"
    tmp = ckpt_dir / f".step-{step:07d}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights if weights is not None else trainable_state(model), tmp / "model.safetensors")
    if extra is not None:
        extra(tmp)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    write_json(tmp / "state.json", {**state, "step": step})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = ckpt_dir / f".{LATEST}.tmp{os.getpid()}"
    pointer.write_text(final.name + "\n")
    publish(pointer, ckpt_dir / LATEST)
    _prune(ckpt_dir, keep)
    return final


def _prune(ckpt_dir: Path, keep: int) -> None:
    steps = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """`--resume latest` (None if the run has no checkpoint yet), or a checkpoint folder."""
    if resume is None:
        return None
    if resume == LATEST:
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / "model.safetensors").is_file():
        raise BlitextError(f"--resume {resume!r}: no model.safetensors there; pass a checkpoints/step-N folder or 'latest'")
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load weights (and optimizer) in place; refuse when recorded fingerprints differ from `expect`."""
    path = Path(path)
    state = read_json(path / "state.json")
    for key, want in (expect or {}).items():
        if not same_identity(state.get(key), want):
            raise BlitextError(f"{path} was trained with {key}={state.get(key)!r}; this run has {want!r}: "
                               f"use the same models and settings, or start a new run (another --out)")
    weights = load_file(path / "model.safetensors")
    model = getattr(model, "module", model)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or (trainable & set(missing)):
        raise BlitextError(f"{path} does not fit this model: missing {sorted(trainable & set(missing))[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if optimizer is not None and (path / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return state


def export_final(run_dir: Path) -> Path:
    """`<run>/final`: the last checkpoint without optimizer state (what later phases load), swapped in whole."""
    src = latest_checkpoint(run_dir)
    final, tmp = Path(run_dir) / "final", Path(run_dir) / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("optimizer.pt"))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final
