"""Checkpoints: trainable weights (safetensors) + optimizer + state, written atomically.

A checkpoint is a folder `checkpoints/step-0000100/` built under a temp name, every file and
the folder fsynced, and renamed; then `checkpoints/latest` (a one-line file) is replaced
atomically: a kill at any moment leaves the previous checkpoint intact and pointed to.
Re-saving a step swaps the folder without a moment where no complete copy exists
(atomic.replace_folder). `state.json`, written last, holds every other file's sha256, so a
damaged checkpoint is refused on load. Frozen models are never stored, only their names and
fingerprints (in `state.json`), so a resume with other weights is refused.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from blitext.atomic import (aside_name, fsync_tree, read_json, remove_folder, replace_folder, sha256_file,
                            write_json, write_text, writing)
from blitext.cache.manifest import same_identity
from blitext.errors import BlitextError, described

LATEST = "latest"
STATE = "state.json"
RESUME_LATEST = "run the same command again with --resume latest"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that train (and buffers of trainable modules); frozen models are left out."""
    model = getattr(model, "module", model)  # unwrap DDP
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items() if n in names}


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict[str, Any], keep: int = 2, weights: dict[str, torch.Tensor] | None = None,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """`weights` replaces the trainable parameters as what is stored; `extra(folder)` writes
    more files (a tokenizer) into the checkpoint before it is published. A full disk or an
    unwritable run folder is one BlitextError line; the temp folder is removed."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    final = ckpt_dir / f"step-{step:07d}"
    tmp = ckpt_dir / f".{final.name}.tmp{os.getpid()}"
    with writing(Path(run_dir), then=RESUME_LATEST):
        _tidy(ckpt_dir)
        try:
            tmp.mkdir(parents=True)
            _write_files(tmp, weights if weights is not None else trainable_state(model), optimizer, extra)
            write_json(tmp / STATE, {**state, "step": step, "sha256": _digests(tmp)})
            fsync_tree(tmp)
            replace_folder(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        write_text(ckpt_dir / LATEST, final.name + "\n")
        _prune(ckpt_dir, keep)
    return final


def _write_files(folder: Path, weights: dict[str, torch.Tensor], optimizer, extra) -> None:
    # Serialised here and written by Python: safetensors' and torch's own writers report a
    # full disk as SafetensorError / RuntimeError without the errno; this way it is an OSError.
    (folder / "model.safetensors").write_bytes(safetensors_bytes(weights))
    if extra is not None:
        extra(folder)
    if optimizer is not None:
        _torch_save(optimizer.state_dict(), folder / "optimizer.pt")


class _KeepError:
    """A file for torch.save that remembers the OSError its C++ writer turns into a RuntimeError."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        sink = _KeepError(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _tidy(ckpt_dir: Path) -> None:
    """What a kill during an earlier save left: a copy set aside whose step folder is missing
    goes back under its name (it is the complete one), other leftovers are deleted."""
    for aside in ckpt_dir.glob(".step-*.old"):
        final = ckpt_dir / aside.name[1:-len(".old")]
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, final)
    for leftover in [*ckpt_dir.glob(".step-*.tmp*"), *ckpt_dir.glob(".step-*.del")]:
        shutil.rmtree(leftover, ignore_errors=True)


def _prune(ckpt_dir: Path, keep: int) -> None:
    steps = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        remove_folder(old)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder `latest` names; while a re-saved step is being swapped in (or after a kill
    right then), the complete copy set aside by replace_folder."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    for candidate in (path, aside_name(path)):
        if candidate.is_dir():
            return candidate
    return None


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
    """Load weights (and optimizer) in place; refuse when recorded fingerprints differ from `expect`,
    and refuse a damaged checkpoint (checksums, unreadable files) in one line."""
    path = Path(path)
    state = _read_state(path)
    for key, want in (expect or {}).items():
        if not same_identity(state.get(key), want):
            raise BlitextError(f"{path} was trained with {key}={state.get(key)!r}; this run has {want!r}: "
                               f"use the same models and settings, or start a new run (another --out)")
    weights = load_weights(path, state)
    model = getattr(model, "module", model)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or (trainable & set(missing)):
        raise BlitextError(f"{path} does not fit this model: missing {sorted(trainable & set(missing))[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if optimizer is not None and (path / "optimizer.pt").is_file():
        optimizer.load_state_dict(_load_optimizer(path))
    return state


def load_weights(path: Path, state: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint folder's model.safetensors, after checking every file against the sha256
    its state.json records: the one place a run's weights are read (resume, --init, generate,
    eval, blitext.load, export, build-prompts), so damaged weights are never used."""
    path = Path(path)
    _check_digests(path, (state if state is not None else _read_state(path)).get("sha256") or {})
    try:
        return load_file(path / "model.safetensors")
    except (OSError, SafetensorError) as e:
        raise damaged(path, f"model.safetensors: {e}") from None


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return read_json(path / STATE)
    except (OSError, ValueError) as e:
        raise damaged(path, f"{STATE}: {e}") from None


def _check_digests(path: Path, digests: dict[str, str]) -> None:
    """Checkpoints written before checksums were recorded have none: they load unchecked."""
    for name, digest in digests.items():
        if (path / name).is_file() and sha256_file(path / name) != digest:
            raise damaged(path, f"{name} does not match its sha256 in {STATE}")


def _load_optimizer(path: Path) -> dict:
    try:
        return torch.load(path / "optimizer.pt", weights_only=True)
    except Exception as e:  # torch reports a damaged file as RuntimeError, UnpicklingError, EOFError, ...
        raise damaged(path, f"optimizer.pt: {described(e)}") from None


def damaged(path: Path, why: str) -> BlitextError:
    """One line: which checkpoint is damaged, why, and the checkpoint to use instead."""
    if path.name == "final":  # a copy of the run's last checkpoint
        kept = sorted(p for p in (path.parent / "checkpoints").glob("step-*") if p.is_dir())
        fix = f"pass the run's last checkpoint {kept[-1]} instead" if kept else "no checkpoint of the run is kept"
        return BlitextError(f"checkpoint {path} is damaged ({why}): {fix}, or train the run again")
    earlier = sorted(p for p in path.parent.glob("step-*") if p.is_dir() and p.name < path.name)
    fix = (f"resume from the one before with --resume {earlier[-1]}" if earlier else "no earlier checkpoint is kept")
    return BlitextError(f"checkpoint {path} is damaged ({why}): {fix}, or start a new run (another --out)")


def export_final(run_dir: Path) -> Path:
    """`<run>/final`: the last checkpoint without optimizer state (what later phases load), swapped in whole."""
    src = latest_checkpoint(run_dir)
    final, tmp = Path(run_dir) / "final", Path(run_dir) / f".final.tmp{os.getpid()}"
    with writing(Path(run_dir), then=RESUME_LATEST):
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("optimizer.pt"))
            fsync_tree(tmp)
            replace_folder(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def folder_tensors(path: Path, keep, rename=lambda name: name) -> dict[str, torch.Tensor]:
    """The tensors of a model folder's .safetensors files whose names `keep` accepts, under
    `rename(name)`, read one by one: a BLIP-2 folder's vision tower or Q-Former without its LLM."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise BlitextError(f"{path} holds no .safetensors weights; convert the checkpoint with save_pretrained")
    state = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            state.update({rename(k): st.get_tensor(k) for k in st.keys() if keep(k)})
    return state
