"""`blitext demo`: the main job on the embedded default, one phase after another.

Each phase reuses its finished artifact, so re-running is cheap (an interrupted phase
resumes). So far: prepare easy-VQA, cache its EfficientNet-Lite0 features, train a P-Former
against the frozen SmolLM2-135M on caption text, cache the reference prompt of every
easy-VQA caption, and check how the prompts sit among the LLM's token embeddings.
Adaptor training and evaluation join as they land.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from blitext.check_prompts import check_prompts, format_report
from blitext.config import default_cache_root
from blitext.console import say
from blitext.data.compose import compositional_captions
from blitext.data.prepare import prepare_dataset
from blitext.extract import ExtractConfig, extract_features
from blitext.models.loading import load_llm
from blitext.pformer import PFormerConfig, train_pformer
from blitext.prompts import BuildPromptsConfig, PromptCache, build_prompts


@dataclass
class DemoConfig:
    images_per_split: int = 500   # easy-VQA train and test images used (4,000 / 1,000 exist); CPU-sized
    pformer_steps: int = 200      # P-Former steps at batch 16 (about 2.5 s each on 2 cores; 0.9 held-out token accuracy)
    n_prompt: int = 8             # soft prompts per sentence (paper: 32; 8 keeps the CPU run short)


def run_demo(config: DemoConfig) -> dict:
    root = default_cache_root()
    tag = f"easy-vqa-{config.images_per_split}"
    say("[bold]1/5 prepare easy-VQA[/] (real images and questions from the easy-vqa package)")
    data = prepare_dataset("easy-vqa", limit=config.images_per_split)

    say("[bold]2/5 extract features[/] with the bundled EfficientNet-Lite0")
    features = root / "features" / f"{tag}__efficientnet-lite0"
    summary = extract_features(ExtractConfig(data=str(data), out=str(features)))

    say("[bold]3/5 train the P-Former[/] on caption text, against the frozen SmolLM2-135M")
    run = root / "runs" / "pformer" / f"demo-{config.n_prompt}x{config.pformer_steps}"
    final = run / "final"
    if not final.is_dir():
        text = root / "data" / "compositional.txt"
        text.write_text("\n".join(compositional_captions()) + "\n")
        train_pformer(PFormerConfig(
            text=[str(data / "captions_train.json"), str(text)], out=str(run), n_prompt=config.n_prompt,
            batch_size=16, max_steps=config.pformer_steps, warmup_steps=30, sample_every=100,
            save_every=100, heldout=32, resume="latest" if (run / "checkpoints").exists() else None))
    else:
        say(f"  reusing {final}")

    say("[bold]4/5 build reference prompts[/] for every easy-VQA caption")
    prompts = root / "prompts" / f"{tag}__{run.name}"
    build_prompts(BuildPromptsConfig(pformer=str(final), captions=sorted(str(p) for p in data.glob("captions_*.json")),
                                     out=str(prompts)))

    say("[bold]5/5 check the prompts[/] against the LLM's token embeddings")
    cache = PromptCache(prompts)
    keys = cache.keys[:64]
    llm = load_llm(cache.cache.manifest["provenance"]["llm"])
    report = check_prompts(cache.get_batch(keys), llm.model.get_input_embeddings().weight.detach(),
                           llm.tokenizer, keys, n_examples=1)
    say(format_report(report))
    return summary
