"""Answers that start with a blank: zero-shot VQA with and without blank tokens at the first step.

After `make demo`, runs `blitext eval vqa` on the demo's P-Former stage-2 run over the first N
easy-VQA test questions twice: --blank-start (LAVIS's decoding: the first new token may be
whitespace alone) and --no-blank-start (blitext's default for answers). Records each one's
accuracy, its text ceiling (the caption as text), the majority-answer base rate, and how many
answers (and text-ceiling answers) came out empty, to bench/results/vqa_blank_start.json.

    PYTHONPATH=. python bench/vqa_blank_start.py [--questions 120] [--run cache/runs/demo/latest]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import git_commit, write_result  # noqa: E402

from blitext.evaluation.evaluate import EvalConfig, eval_vqa  # noqa: E402
from blitext.config import default_cache_root  # noqa: E402


def blank(predictions_file: Path) -> int:
    rows = json.loads(predictions_file.read_text())
    rows = rows if isinstance(rows, list) else list(rows.values())
    return sum(not (r["answer"] if isinstance(r, dict) else r).strip() for r in rows)


def one(run: Path, data: Path, features: Path, questions: int, blank_start: bool, out: Path) -> dict:
    t0 = time.time()
    eval_vqa(EvalConfig(adapter=str(run), features=str(features), data=str(data / "vqa_test_questions.json"),
                        annotations=str(data / "vqa_test_annotations.json"), out=str(out), limit=questions,
                        blank_start=blank_start))
    m = json.loads((out / "metrics.json").read_text())
    return {"blank_start": blank_start, "accuracy": m["metrics"]["accuracy"],
            "per_answer_type": m["metrics"].get("per_answer_type"),
            "text_ceiling": m["text_ceiling"]["metrics"]["accuracy"], "base_rate": m["base_rate"]["accuracy"],
            "empty_answers": blank(out / "predictions.json"),
            "empty_ceiling_answers": blank(out / "ceiling_predictions.json"),
            "verdict": m["ceiling_verdict"]["line"], "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=120)
    ap.add_argument("--run", type=Path, default=default_cache_root() / "runs" / "demo" / "latest")
    args = ap.parse_args()
    commit = git_commit()
    root = default_cache_root()
    data = root / "data" / "easy-vqa-500" / "easy-vqa"
    features = root / "features" / "easy-vqa-500__efficientnet-lite0"
    run = args.run.resolve() / "pformer-stage2"
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one(run, data, features, args.questions, flag, Path(tmp) / str(flag)) for flag in (True, False)]
    write_result("vqa_blank_start", {"commit": commit, "command": "PYTHONPATH=. python bench/vqa_blank_start.py "
                                     + " ".join(sys.argv[1:]), "run": str(run), "questions": args.questions,
                                     "variants": rows})


if __name__ == "__main__":
    main()
