"""The budget curve: caption quality against the LLM steps a cell paid for, and what each cell cost.

A cell's curve comes from one run's schedule, unchanged: its stage-1 adaptor (stage-2 step 0: the
LLM never ran), the snapshots stage 2 kept (`snapshot_steps`) and its final weights. Each point is
greedy captions of the same test images, scored by exact match and CIDEr. Costs count what the
steps are made of: LLM forward passes (stage 2 runs the frozen LLM once per pair; stage 1 never),
pairs seen, and the wall time of each stage from its metrics.jsonl.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch

from blitext.atomic import read_json
from blitext.evaluation.evaluate import EvalConfig, captions_current, eval_caption
from blitext.loop import snapshots
from blitext.training import read_metrics

GOAL = 0.85  # exact match a cell must reach for the curve's "steps to" verdict


def captions_file(data: Path) -> Path:
    """The captions a curve scores: easy-VQA's data folder means its captions_test.json; a .json is itself."""
    data = Path(data)
    return data if data.suffix == ".json" else data / "captions_test.json"


def caption_config(adapter: Path, features: Path, data: Path, limit: int, out: Path, meteor: str = "off",
                   max_new_tokens: int = 12) -> EvalConfig:
    """Greedy captions with the empty prompt the adaptor was trained under, 1..12 new tokens (easy-VQA's
    captions are 3-4 tokens; the paper's COCO settings are for COCO-length captions). METEOR (Java)
    only where asked: the curve's inner points need exact match and CIDEr. `data`: see captions_file."""
    return EvalConfig(adapter=str(adapter), features=str(features), data=str(captions_file(data)),
                      out=str(out), limit=limit, prompt="", num_beams=1, min_new_tokens=1,
                      max_new_tokens=max_new_tokens, meteor=meteor, batch_size=50)


def eval_name(data: Path, limit: int, max_new_tokens: int = 12) -> str:
    """The eval folder of one curve point: `caption-easy-vqa-<limit>` for easy-VQA's folder (the demo's
    name), `caption-<split>-<limit>-greedy` for a caption JSON; `-<n>t` when not 12 new tokens."""
    data = Path(data)
    name = (f"caption-{data.stem.removeprefix('captions_')}-{limit}-greedy" if data.suffix == ".json"
            else f"caption-easy-vqa-{limit}")
    return name + ("" if max_new_tokens == 12 else f"-{max_new_tokens}t")


def caption_metrics(adapter: Path, features: Path, data: Path, limit: int, meteor: str = "off",
                    max_new_tokens: int = 12) -> dict:
    """Every caption metric of one adaptor (a run folder or a checkpoint), reused once written to
    `<adapter>/eval/<eval_name>`."""
    from blitext.console import console

    out = Path(adapter) / "eval" / eval_name(data, limit, max_new_tokens)
    if not captions_current(out):
        with console.capture():  # the budget table prints these numbers together; not one table per point
            eval_caption(caption_config(adapter, features, data, limit, out, meteor, max_new_tokens))
    return read_json(out / "metrics.json")["metrics"]


def caption_point(adapter: Path, features: Path, data: Path, limit: int, meteor: str = "off",
                  max_new_tokens: int = 12) -> dict:
    metrics = caption_metrics(adapter, features, data, limit, meteor, max_new_tokens)
    return {"exact_match": metrics["exact_match"], "CIDEr": metrics["CIDEr"]}


def curve(stage1: Path, stage2: Path, features: Path, data: Path, limit: int, max_new_tokens: int = 12,
          final_meteor: str = "auto") -> list[dict]:
    """[{step, exact_match, CIDEr}] at stage-2 step 0 (the stage-1 adaptor, if it can write to the LLM:
    trained with L_align; otherwise its llm_proj never met the LLM and the point is 0), every
    snapshot, and the final step (scored with METEOR too unless final_meteor="off": the demo's table).
    `data`: easy-VQA's data folder or a caption JSON (captions_file)."""
    def point(adapter: Path, meteor: str = "off") -> dict:
        return caption_point(adapter, features, data, limit, meteor, max_new_tokens)

    points = []
    if stage1_aligned(stage1):
        points.append({"step": 0, **point(stage1)})
    else:
        points.append({"step": 0, "exact_match": 0.0, "CIDEr": 0.0, "untrained_llm_proj": True})
    for step, folder in snapshots(stage2).items():
        points.append({"step": step, **point(folder)})
    final = {"step": read_json(stage2 / "final" / "state.json")["step"], **point(stage2, final_meteor)}
    return sorted({p["step"]: p for p in [*points, final]}.values(), key=lambda p: p["step"])


def stage1_aligned(stage1: Path) -> bool:
    """Whether a stage-1 run trained with L_align (so its llm_proj can already write to the LLM)."""
    return float(read_json(stage1 / "final" / "state.json")["resume_config"]["w_align"]) > 0


def steps_to(points: list[dict], goal: float = GOAL) -> int | None:
    """The first stage-2 step on the curve whose exact match reaches `goal` (None: never)."""
    return next((p["step"] for p in points if p["exact_match"] >= goal), None)


def costs(stage1: Path, stage2: Path) -> dict:
    """What the cell paid: LLM forward passes (pairs through the frozen LLM), pairs seen, and each
    stage's training wall time (the sum of its logged steps' times; log_every must be 1)."""
    cost = {}
    for name, run in (("stage1", stage1), ("stage2", stage2)):
        state = read_json(run / "final" / "state.json")
        batch, steps = state["config"]["batch_size"], state["step"]
        lines = [m for m in read_metrics(run / "metrics.jsonl") if m.get("pairs_per_s")]
        cost[name] = {"steps": steps, "pairs": steps * batch,
                      "seconds": round(sum(batch / m["pairs_per_s"] for m in lines), 1)}
    cost["llm_forward_pairs"] = cost["stage2"]["pairs"]  # stage 1 never runs the LLM
    cost["pairs_seen"] = cost["stage1"]["pairs"] + cost["stage2"]["pairs"]
    return cost


def summary(curves: dict[str, list[list[dict]]], goal: float = GOAL) -> dict[str, dict]:
    """Per cell over seeds: each seed's steps to `goal`, and the median (a seed that never reaches it
    counts as past the last step)."""
    out = {}
    for cell, runs in curves.items():
        reached = [steps_to(points, goal) for points in runs]
        last = max(p["step"] for points in runs for p in points)
        ranked = [s if s is not None else last + 1 for s in reached]
        out[cell] = {"steps_to_goal": reached, "median_steps_to_goal": statistics.median(ranked),
                     "all_reached": all(s is not None for s in reached)}
    return out


def verdict(summ: dict[str, dict], labels: dict[str, str], goal: float = GOAL) -> str:
    """One line: at which stage-2 step each cell first writes `goal` exact captions."""
    parts = []
    for cell, s in summ.items():
        seeds = len(s["steps_to_goal"])
        reached = [x for x in s["steps_to_goal"] if x is not None]
        if not reached:
            parts.append(f"{labels[cell]} never reaches {goal:.2f} exact ({seeds} seed{'s' * (seeds > 1)})")
            continue
        where = f"step {reached[0]}" if seeds == 1 else f"median step {s['median_steps_to_goal']:g} (seeds: " + \
            ", ".join("never" if x is None else str(x) for x in s["steps_to_goal"]) + ")"
        parts.append(f"{labels[cell]} reaches {goal:.2f} exact at stage-2 {where}")
    return "; ".join(parts)


def plot_curves(curves: dict[str, list[list[dict]]], out: Path, labels: dict[str, str], goal: float = GOAL) -> Path:
    """Exact match and CIDEr against stage-2 steps, one line per (cell, seed), the goal dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from blitext.plot import save_png

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    palette = ("tab:grey", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
               "tab:olive", "tab:cyan")  # the demo's two cells keep its grey and blue
    colours = {cell: palette[i % len(palette)] for i, cell in enumerate(curves)}
    for cell, runs in curves.items():
        for i, points in enumerate(runs):
            steps = [p["step"] for p in points]
            for ax, key in zip(axes, ("exact_match", "CIDEr")):
                ax.plot(steps, [p[key] for p in points], marker="o", color=colours[cell], alpha=0.85,
                        label=labels[cell] if i == 0 else None)
    axes[0].axhline(goal, ls="--", color="black", lw=0.8)
    for ax, title in zip(axes, ("exact match", "CIDEr")):
        ax.set_xlabel("stage-2 steps (the frozen LLM runs)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    try:
        return save_png(fig, out)
    finally:
        plt.close(fig)


@torch.inference_mode()
def reference_ceiling(pformer: Path, data: Path, limit: int) -> dict:
    """What alignment could reach at best: the P-Former's own reference prompts of the test captions,
    fed to the frozen LLM it was trained against (greedy, as the adaptor's captions), scored by exact
    match against those captions. Returns {"exact_match", "captions", "examples"}."""
    from blitext.evaluation.decoding import GenerationSettings, generate_after
    from blitext.evaluation.score import caption_references
    from blitext.metrics import caption_exact_match
    from blitext.models.loading import load_llm
    from blitext.pformer.prompts import load_pformer

    refs = caption_references(str(captions_file(data)), limit)
    ids = list(refs)
    texts = [refs[i][0] for i in ids]
    loaded = load_pformer(pformer)
    enc = loaded.tokenizer(texts, padding=True, truncation=True, max_length=loaded.state["config"]["max_text_len"],
                           return_tensors="pt")
    prompts = loaded.model(enc.input_ids, enc.attention_mask).prompts  # (N, P, d_llm)
    llm = load_llm(loaded.state["llm"])
    settings = GenerationSettings(prompt="", num_beams=1, min_new_tokens=1, max_new_tokens=12, length_penalty=1.0)
    end = loaded.state["config"].get("end_of_text", "\n")
    hyps = []
    for start in range(0, len(ids), 16):
        hyps += generate_after(llm, prompts[start:start + 16], [""] * len(ids[start:start + 16]), settings, end)
    return {"exact_match": caption_exact_match({i: [t] for i, t in zip(ids, texts)}, dict(zip(ids, hyps))),
            "captions": len(ids), "examples": [[t, h] for t, h in zip(texts[:6], hyps[:6])]}
