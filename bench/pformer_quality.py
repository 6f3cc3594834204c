"""P-Former quality on the embedded default: held-out reconstruction and paraphrase geometry.

    python bench/pformer_quality.py [--steps 400] [--n-prompt 8] [--batch-size 16]

Trains a P-Former (bundled all-MiniLM-L6-v2 -> bundled frozen SmolLM2-135M, full paper loss:
LM + two-view SimCSE + vocabulary) on compositional captions (blitext/data/compose.py) with
64 distinct sentences held out, then measures on those unseen sentences:
  - teacher-forced token accuracy of the frozen LLM given the predicted prompts (goal >= 0.9)
  - greedy reconstruction: exact-match rate and token accuracy of the greedy text
  - paraphrase pairs vs random pairs: mean [CLS] cosine similarity, and the share of sentences
    whose paraphrase is nearer than a random other sentence.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

from blitext.data.compose import compositional_captions, paraphrase  # noqa: E402
from blitext.metrics.llm import teacher_forced_accuracy  # noqa: E402
from blitext.models.loading import load_llm  # noqa: E402
from blitext.pformer.train import PFormerConfig, generate_from_prompts, split_corpus, train_pformer  # noqa: E402
from blitext.data.text import read_sentences  # noqa: E402
from blitext.pformer.prompts import load_pformer  # noqa: E402

ROOT = Path(__file__).parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--n-prompt", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "cache" / "runs" / "pformer" / "bench-quality"))
    args = ap.parse_args()
    text = ROOT / "cache" / "data" / "compositional.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text("\n".join(compositional_captions()) + "\n")
    config = PFormerConfig(text=[str(text)], out=args.out, n_prompt=args.n_prompt, batch_size=args.batch_size,
                           max_steps=args.steps, warmup_steps=min(50, args.steps // 10), lr=1e-4,
                           sample_every=100, save_every=100, heldout=64,
                           resume="latest" if (Path(args.out) / "checkpoints").exists() else None)
    t = time.perf_counter()
    final = train_pformer(config)
    minutes = (time.perf_counter() - t) / 60
    pformer = load_pformer(final)
    llm = load_llm(pformer.state["llm"])
    heldout = split_corpus(read_sentences([str(text)]), config.heldout, config.seed).heldout
    result = evaluate(pformer, llm, heldout, config)
    write_result("pformer_quality", {"command": "python bench/pformer_quality.py", "steps": args.steps,
                                     "n_prompt": args.n_prompt, "batch_size": args.batch_size,
                                     "heldout_sentences": len(heldout), "train_minutes": round(minutes, 1),
                                     **result, "goal": "heldout teacher-forced token accuracy >= 0.9"})


@torch.no_grad()
def evaluate(pformer, llm, heldout: list[str], config: PFormerConfig) -> dict:
    tok = pformer.tokenizer
    enc = tok(heldout, padding=True, return_tensors="pt")
    out = pformer.model(enc.input_ids, enc.attention_mask)
    tgt = llm.lm_batch(heldout, config.end_of_text, 10**6)
    accuracy = teacher_forced_accuracy(llm, out.prompts, tgt)
    greedy = generate_from_prompts(llm, out.prompts, config.end_of_text, config.max_text_len)
    exact = sum(g == s for g, s in zip(greedy, heldout)) / len(heldout)
    word_acc = sum(sum(a == b for a, b in zip(g.split(), s.split())) / len(s.split())
                   for g, s in zip(greedy, heldout)) / len(heldout)
    return {"heldout_token_accuracy": round(accuracy, 4), "greedy_exact_match": round(exact, 4),
            "greedy_word_accuracy": round(word_acc, 4),
            "examples": [[s, g] for s, g in zip(heldout[:5], greedy[:5])], **paraphrase_geometry(pformer, heldout)}


@torch.no_grad()
def paraphrase_geometry(pformer, sentences: list[str]) -> dict:
    def cls(texts):
        enc = pformer.tokenizer(texts, padding=True, return_tensors="pt")
        return F.normalize(pformer.model.encode(enc.input_ids, enc.attention_mask), dim=-1)

    rng = random.Random(0)
    base = cls(sentences)
    results = {}
    others = [rng.choice([j for j in range(len(sentences)) if j != i]) for i in range(len(sentences))]
    random_sim = (base * base[others]).sum(-1)
    para_sims = [(base * cls([paraphrase(s, style) for s in sentences])).sum(-1) for style in range(3)]
    para = torch.stack(para_sims).mean(0)
    results["cls_cosine_paraphrase_mean"] = round(float(para.mean()), 4)
    results["cls_cosine_random_pair_mean"] = round(float(random_sim.mean()), 4)
    results["paraphrase_nearer_than_random_share"] = round(float((para > random_sim).float().mean()), 4)
    return results


if __name__ == "__main__":
    main()
