"""A trained adaptor on disk: what a checkpoint holds, finding it, loading it, and `--init`.

A checkpoint is the whole adaptor (the Q-Former of either stage, frozen parts too, or the video
Transformer) in model.safetensors, its description and the producers/fingerprints of
everything it was trained on in state.json, and the Q-Former's tokenizer in tokenizer/.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from blitext.atomic import read_json
from blitext.cache import FeatureCache
from blitext.cache.manifest import same_identity
from blitext.checkpoint import latest_checkpoint, load_weights
from blitext.console import say
from blitext.errors import BlitextError
from blitext.models.fingerprint import fingerprint
from blitext.models.loading import load_llm, load_vision_encoder
from blitext.models.qformer import QFormer
from blitext.models.video_adapter import VideoAdapter


def adapter_weights(model: QFormer) -> dict[str, torch.Tensor]:
    """Every adaptor tensor (frozen parts too): a checkpoint of either stage is a whole Q-Former."""
    model = getattr(model, "module", model)
    return {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items()}


def adapter_folder(path: str | Path) -> Path:
    """An adaptor checkpoint: `<run>/final`, a `checkpoints/step-N`, or a run folder."""
    path = Path(path)
    for candidate in (path, path / "final", latest_checkpoint(path) if path.is_dir() else None):
        if candidate is not None and (candidate / "model.safetensors").is_file() and (candidate / "state.json").is_file():
            state = read_json(candidate / "state.json")
            if "qformer_config" in state or "video_adapter" in state:
                return candidate
    raise BlitextError(f"{str(path)!r} holds no adaptor checkpoint (model.safetensors + state.json from "
                       f"train-adapter); pass its run folder or <run>/final")


def load_init(init: str, model: QFormer, identity: dict, stage: int = 2) -> None:
    """Start from another run's Q-Former and llm_proj (stage 2 from stage 1: same features, same LLM
    width, same queries), or from released BLIP-2 weights (blitext.models.released)."""
    from blitext.models.released import load_released, released_weights

    released = released_weights(init)
    if released is not None:
        load_released(model, *released, stage)
        return
    folder = adapter_folder(init)
    state = read_json(folder / "state.json")
    for key, what in (("features_producer", "visual features"), ("llm_fingerprint", "LLM")):
        if not same_identity(state.get(key), identity[key]):
            raise BlitextError(f"--init {folder} was trained on other {what} ({state.get(key)}) than this run "
                               f"({identity[key]}): stage 2 must use stage 1's {what}")
    if state.get("prompts_producer") and identity["prompts_producer"] and \
            state["prompts_producer"]["pformer"] != identity["prompts_producer"]["pformer"]:
        raise BlitextError(f"--init {folder} was aligned to {state['prompts_producer']['pformer']} but --prompts "
                           f"come from {identity['prompts_producer']['pformer']}: use one P-Former for both stages")
    weights = load_weights(folder, state)
    own = model.state_dict()
    bad = [k for k, v in weights.items() if k not in own or own[k].shape != v.shape]
    if bad or set(own) - set(weights):
        raise BlitextError(f"--init {folder} does not fit this Q-Former ({(bad or sorted(set(own) - set(weights)))[:3]}); "
                           f"use the same --text-encoder, --n-prompt, --num-layers and --cross-attention-frequency "
                           f"as stage 1")
    model.load_state_dict(weights)
    say(f"stage 2 starts from {folder} (stage {state['resume_config']['stage']}, step {state['step']})")



@dataclass
class LoadedAdapter:
    model: QFormer | VideoAdapter
    tokenizer: object   # the Q-Former's (text encoder's + [DEC]); None for a video adaptor
    state: dict         # the checkpoint's state.json: producers, fingerprints, config
    fingerprint: str
    path: Path

    @property
    def features_producer(self) -> dict:
        return self.state["features_producer"]

    @property
    def llm_name(self) -> str:
        return self.state["config"]["llm"]

    @property
    def end_of_text(self) -> str:
        return self.state["config"]["end_of_text"]

    @property
    def is_video(self) -> bool:
        return "video_adapter" in self.state

    @property
    def aligned(self) -> bool:
        """Whether llm_proj was trained toward the P-Former's reference prompts for this LLM (w_align > 0):
        then the prompts are meant for the LLM even before it ever ran (backward decoupling)."""
        if "video_adapter" in self.state:  # a video run's alignment phase alone stays refused (its LM phase writes)
            return False
        return float(self.state["resume_config"].get("w_align") or 0) > 0

    @property
    def stage(self) -> int:
        """2 when the prompts were trained on the LLM's loss (a video run's LM or joint phase counts)."""
        if "video_adapter" in self.state:
            return 2 if any(p["name"] != "align" for p in self.state["phases"]) else 1
        return self.state["resume_config"]["stage"]


def load_adapter(path: str | Path, device: str = "cpu") -> LoadedAdapter:
    """A train-adapter checkpoint (either stage), in eval mode."""
    from transformers import AutoTokenizer

    folder = adapter_folder(path)
    state = read_json(folder / "state.json")
    model = (VideoAdapter if "video_adapter" in state else QFormer).from_description(state)
    missing, unexpected = model.load_state_dict(load_weights(folder, state), strict=False)
    if missing or unexpected:
        raise BlitextError(f"{folder}/model.safetensors does not fit its own description: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}; the checkpoint is damaged")
    has_tokenizer = (folder / "tokenizer").is_dir()  # the video adaptor reads no text
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True) if has_tokenizer else None
    name = f"adapter-{folder.parent.name if folder.name == 'final' else folder.name}"
    return LoadedAdapter(model.to(device).eval(), tokenizer, state, fingerprint(name, folder / "model.safetensors"),
                         folder)


def load_llm_for_generation(adapter: LoadedAdapter, llm_name: str | None, device: str):
    """The frozen LLM the adaptor's prompts were trained for, refused if they never met its loss nor
    the P-Former's reference prompts (a stage-1 run with L_align writes captions from alignment alone)."""
    if adapter.stage != 2 and not adapter.aligned:
        if "video_adapter" in adapter.state:
            raise BlitextError(f"{adapter.path} is a video run with only the alignment phase: its prompts never "
                               f"learned the LLM's loss; train the LM phase too (train-adapter --modality video "
                               f"with --epochs above 0)")
        raise BlitextError(f"{adapter.path} is a stage-1 adaptor trained without L_align: its llm_proj never met "
                           f"the LLM; pass a stage-2 run (train-adapter --stage 2 --init {adapter.path.parent}) "
                           f"or a stage 1 with --w-align above 0")
    llm = load_llm(llm_name or adapter.llm_name, device=device)
    if llm.fingerprint != adapter.state["llm_fingerprint"]:
        raise BlitextError(f"{adapter.path} was trained for {adapter.state['llm_fingerprint']}, not {llm.fingerprint}: "
                           f"pass the same --llm")
    return llm


def adapter_encoder(adapter: LoadedAdapter, device: str = "cpu"):
    """The frozen vision encoder the adaptor was trained on, refused if its weights or preprocessing differ."""
    from blitext.cache.manifest import require_producer

    want = adapter.features_producer
    encoder = load_vision_encoder(want["encoder"], device=device)
    require_producer(encoder.producer(), want, adapter.path, "provide the vision encoder the adaptor was trained on")
    return encoder


@torch.inference_mode()
def prompts_from_adapter(path: str | Path, features: str | Path, limit: int) -> tuple[list[str], torch.Tensor, str]:
    """(image ids, the adaptor's prompts (N, Q, d_llm), LLM name) for the first `limit` cached images:
    what check-prompts compares with the LLM's token embeddings."""
    adapter = load_adapter(path)
    cache = FeatureCache(features, expect=adapter.features_producer,
                         fix="pass the feature cache the adaptor was trained on")
    ids = cache.keys[:limit]
    feats, mask = cache.get_batch(ids)
    return ids, adapter.model.prompts(feats.float(), mask), adapter.llm_name
