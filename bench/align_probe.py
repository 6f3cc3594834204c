"""What stage 1's alignment taught the adaptor, in the claim study's runs: does it carry the
image's colour and shape into its prompts, as the reference prompts carry the caption's?

    python bench/align_probe.py [--size 50]     # after bench/reproduce.py (and its levers) ran

For the reference prompts of the paired captions and for each stage-1 adaptor's prompts on the
same training images: the RMS, the between-image spread (RMS of prompt - mean prompt) as a share
of the references' own, the MSE to the references split into its mean part and its between-image
part, and a probe: the share of images whose prompts lie nearest to the reference centroid of
their own colour (8) or shape (3). Chance is 1/8 and 1/3. Writes bench/results/align_probe.json.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

from blitext.atomic import read_json  # noqa: E402
from blitext.config import default_cache_root  # noqa: E402
from blitext.models.adapter_checkpoint import prompts_from_adapter  # noqa: E402
from blitext.pformer.prompts import PromptCache  # noqa: E402


def nearest_centroid(x: torch.Tensor, reference: torch.Tensor, labels: list[str], leave_out: bool) -> float:
    """Share of rows of x nearest to their own label's reference centroid (leave_out: x is the
    references, and each row's own vector is left out of its centroid)."""
    names = sorted(set(labels))
    y = torch.tensor([names.index(label) for label in labels])
    sums = torch.stack([reference[y == k].sum(0) for k in range(len(names))])
    counts = torch.tensor([(y == k).sum() for k in range(len(names))]).float()
    right = 0
    for i in range(len(x)):
        s, n = sums.clone(), counts.clone()
        if leave_out:
            s[y[i]] -= reference[i]
            n[y[i]] -= 1
        centroids = s / n.clamp_min(1)[:, None]
        right += int((x[i] - centroids).pow(2).sum(1).argmin() == y[i])
    return right / len(x)


def describe(x: torch.Tensor, reference: torch.Tensor, labels: dict, leave_out: bool = False) -> dict:
    r_mean, x_mean = reference.mean(0), x.mean(0)
    ref_spread = (reference - r_mean).pow(2).mean().sqrt()
    return {"rms": round(x.pow(2).mean().sqrt().item(), 5),
            "spread_vs_references": round(((x - x_mean).pow(2).mean().sqrt() / ref_spread).item(), 3),
            "mse_to_references": round((x - reference).pow(2).mean().item(), 7),
            "mse_mean_part": round((x_mean - r_mean).pow(2).mean().item(), 7),
            "mse_between_part": round(((x - x_mean) - (reference - r_mean)).pow(2).mean().item(), 7),
            **{f"{attr}_probe": round(nearest_centroid(x, reference, values, leave_out), 3)
               for attr, values in labels.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=50)
    a = ap.parse_args()
    root = default_cache_root() / "runs" / "bench-reproduce"
    data = root / "data" / f"withheld-{a.size}" / "easy-vqa"
    records = {r["image_id"]: r for r in read_json(data / "captions_train.json")}
    results = {}
    for prompts in sorted((root / "prompts").glob(f"withheld-{a.size}*")):
        cache = PromptCache(prompts)
        keys = {k.split("#")[0]: k for k in cache.keys}
        ids = sorted(keys)
        reference = cache.get_batch([keys[i] for i in ids]).float().flatten(1)
        labels = {attr: [records[i][attr] for i in ids] for attr in ("color", "shape")}
        suffix = prompts.name[len(f"withheld-{a.size}"):]
        results[f"references{suffix}"] = describe(reference, reference, labels, leave_out=True)
        for run in sorted(root.glob(f"n{a.size}-seed*/*-stage1")):
            state = read_json(run / "final" / "state.json")
            if (state.get("prompts_producer") or {}).get("pformer") != cache.producer.get("pformer"):
                continue  # aligned to another P-Former's references
            got, x, _ = prompts_from_adapter(run, root / "features" / f"withheld-{a.size}", 10**6)
            where = {image_id: i for i, image_id in enumerate(got)}
            x = x[[where[i] for i in ids]].float().flatten(1)
            results[f"{run.parent.name}/{run.name}"] = {
                "align_loss": state["config"].get("align_loss", "mse"), **describe(x, reference, labels)}
            print(run.parent.name, run.name, results[f"{run.parent.name}/{run.name}"], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    write_result("align_probe", {"command": "python bench/align_probe.py " + " ".join(sys.argv[1:]), "commit": commit,
                                 "paired_images": a.size, "chance": {"color_probe": 1 / 8, "shape_probe": 1 / 3},
                                 "results": results})


if __name__ == "__main__":
    main()
