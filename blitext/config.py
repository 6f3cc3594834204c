"""Typed configs: dataclass defaults (the paper's), then a config file, then the command line.

Every phase has one `@dataclass` config. `resolve_config` merges the layers and refuses
unknown keys; `provenance` is what gets written beside every artifact.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from blitext import __version__
from blitext.errors import BlitextError
from blitext.models.registry import DEFAULT_LLM, DEFAULT_TEXT_ENCODER


C = TypeVar("C")


def default_cache_root() -> Path:
    """Root of on-disk artifacts: $BLITEXT_CACHE; else the source checkout's cache/ folder
    (whatever the working directory); else ./cache for an installed package."""
    if os.environ.get("BLITEXT_CACHE"):
        return Path(os.environ["BLITEXT_CACHE"])
    checkout = Path(__file__).resolve().parent.parent / "cache"
    return checkout if (checkout / "README.md").is_file() else Path("cache")


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BlitextError(f"config file {path} does not exist")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text())
        return json.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise BlitextError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") from None


def resolve_config(cls: type[C], file: str | Path | None = None, **overrides: Any) -> C:
    """Dataclass defaults < config file < command-line overrides (None means 'not given')."""
    values: dict[str, Any] = {}
    if file is not None:
        values.update(read_config_file(file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        where = f" in {file}" if file else ""
        raise BlitextError(
            f"unknown config key(s) {unknown}{where}; {cls.__name__} accepts: {sorted(known)}"
        )
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Config files give JSON types; turn them into the field's declared scalar type."""
    target = hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Optional[X] / X | None -> X
        target = next(a for a in typing.get_args(hint) if a is not type(None))
    if value is None or not isinstance(target, type) or isinstance(value, target):
        return value
    if target in (int, float, str, Path):
        try:
            return target(value)
        except (TypeError, ValueError):
            raise BlitextError(f"config key {name!r} must be {target.__name__}, got {value!r}") from None
    return value


def git_commit() -> str | None:
    """The commit of the blitext checkout in use, or None when installed without git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def provenance(config: Any) -> dict[str, Any]:
    """What every artifact records about how it was made."""
    return {"blitext_version": __version__, "git_commit": git_commit(), "config": to_jsonable(config)}


@dataclasses.dataclass
class TrainerFields:
    """The fields every trainer's config shares, with one default each (PFormerConfig, AdapterConfig and
    VideoAdapterConfig extend it, beside loop.RunOptions); the paper's values (docs/method.md#loss-weights-and-schedules)."""
    llm: str = DEFAULT_LLM              # the frozen LLM (paper: OPT-2.7B); the adaptor's stage 1 needs only its width
    text_encoder: str = DEFAULT_TEXT_ENCODER  # initialisation of the P-Former / Q-Former / video Transformer (paper: bert-base-uncased)
    max_text_len: int = 32              # tokens of a text; longer text is truncated (and counted)
    end_of_text: str = "\n"             # appended to every LM target, so the LLM learns to stop (paper's OPT setup);
                                        # an encoder-decoder LLM (T5) ends every text with its </s> instead
    out: str | None = None              # run folder; default: <cache root>/runs/<trainer>/... (each trainer's default_run_dir)
    max_steps: int | None = None        # overrides epochs (an adaptor's 0: its alignment phase alone)
    lr: float = 1e-4                    # peak AdamW rate, after a linear warm-up, cosine decay to min_lr
    min_lr: float = 1e-5
    warmup_start_lr: float = 1e-6
    weight_decay: float = 0.05
    seed: int = 42                      # initialisation, data order, masks and dropout: one run is one seed
    max_grad_norm: float | None = None  # clip the gradient's global norm (paper and LAVIS: no clipping)
