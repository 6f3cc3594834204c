"""`--init` from released BLIP-2 weights: a transformers folder (the Salesforce/blip2-* layout) or
LAVIS's checkpoint (`blip2_pretrained.pth`, blip2_opt / blip2_t5 fine-tunes), renamed through
blitext.models.blip2_layout onto blitext's Q-Former.

What a stage needs must come from the checkpoint: stage 2 the query path (queries, self- and
cross-attention, the queries' feed-forward); stage 1 the text branch too. `llm_proj` is taken
when its shape fits this run's LLM and kept fresh otherwise (another LLM's width); stage 1's ITG
head and the ITC temperature, which transformers' folders do not hold, keep their start values.
Each of those is said in one line.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from blitext.atomic import read_json
from blitext.console import say
from blitext.errors import BlitextError, first_line
from blitext.models.blip2_layout import from_hf, from_lavis

LAVIS_SUFFIXES = (".pth", ".pt", ".bin")
OPTIONAL = ("llm_proj.", "lm_transform.", "lm_bias", "temp")  # kept at their start value when absent


def released_weights(init: str | Path) -> tuple[dict[str, torch.Tensor], str] | None:
    """(blitext-named weights, a description of the source), or None when `init` is a blitext run."""
    path = Path(init)
    if path.is_file() and path.suffix in LAVIS_SUFFIXES:
        return _renamed(_lavis_state(path), from_lavis), f"LAVIS checkpoint {path.name}"
    config = path / "config.json"
    if path.is_dir() and config.is_file() and read_json(config).get("model_type") == "blip-2":
        return _renamed(_safetensors_state(path), from_hf), f"BLIP-2 folder {path}"
    return None


def load_released(model, weights: dict[str, torch.Tensor], source: str, stage: int) -> None:
    """Copy `weights` onto `model` (a QFormer); refuse in one line when a needed weight is absent or
    has another shape."""
    own = model.state_dict()
    wrong = [k for k, v in weights.items() if k in own and own[k].shape != v.shape and not k.startswith("llm_proj.")]
    if wrong:
        k = wrong[0]
        raise BlitextError(f"--init {source}: {k} is {tuple(weights[k].shape)} there but {tuple(own[k].shape)} in this "
                           f"Q-Former ({len(wrong)} such); match its --text-encoder (bert-base-uncased for BLIP-2), "
                           f"--n-prompt, --cross-attention-frequency and the features' encoder")
    needed = [k for k in own if _needed(k, stage)]
    missing = [k for k in needed if k not in weights]
    if missing:
        what = "the text branch (word embeddings, text feed-forward, ITC/ITM heads)" if stage == 1 else "the query path"
        raise BlitextError(f"--init {source} lacks {what} that stage {stage} trains ({missing[0]}, {len(missing)} "
                           f"missing); stage 1 needs Blip2ForImageTextRetrieval's (Salesforce/blip2-itm-vit-g) or "
                           f"LAVIS's blip2_pretrained.pth")
    proj = weights.get("llm_proj.weight")
    proj_fits = proj is not None and proj.shape == own["llm_proj.weight"].shape
    take = {k: v for k, v in weights.items() if k in own and (proj_fits or not k.startswith("llm_proj."))}
    model.load_state_dict(take, strict=False)
    kept = sorted({k.split(".")[0] for k in own if k.startswith(OPTIONAL) and k not in take})
    why = " (another LLM's width)" if proj is not None and not proj_fits else ""
    say(f"stage {stage} starts from {source}" + (f"; kept at their start: {', '.join(kept)}{why}" if kept else ""))


def _needed(name: str, stage: int) -> bool:
    from blitext.models.qformer import QUERY_PATH, text_ffn

    if name.startswith(OPTIONAL) or name.endswith("position_ids"):
        return False
    if stage == 2:
        return name.startswith(QUERY_PATH) and not text_ffn(name)
    return True


def _renamed(state: dict[str, torch.Tensor], rename) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        ours = rename(name)
        if ours is not None:
            out[ours] = tensor
    return out


def _lavis_state(path: Path) -> dict[str, torch.Tensor]:
    """LAVIS's checkpoint, unpickled with weights_only=True: tensors and plain containers only."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        raise BlitextError(f"--init {path}: cannot be read with weights_only=True ({first_line(e, 160)}); it pickles more than "
                           f"tensors. Only if you trust it: torch.save(torch.load(path, weights_only=False)['model'], "
                           f"'weights.pth') and pass that") from None
    except (OSError, EOFError) as e:
        raise BlitextError(f"--init {path}: unreadable ({e}); download it again") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise BlitextError(f"--init {path}: not a LAVIS checkpoint (expected {{'model': state_dict}} or a state dict)")
    return state


def _safetensors_state(path: Path) -> dict[str, torch.Tensor]:
    """The folder's adaptor tensors only (a BLIP-2's LLM is gigabytes that --init never needs)."""
    from blitext.checkpoint import folder_tensors

    try:
        return folder_tensors(path, lambda k: from_hf(k) is not None)
    except BlitextError as e:
        raise BlitextError(f"--init {e}") from None
