"""`blitext score caption|vqa`: the metrics of predictions from any system, computed by the code
`blitext eval` computes its own with, so scoring eval's predictions.json gives its metrics.json.

Predictions are the official results formats: COCO captions [{"image_id", "caption"}], VQA
[{"question_id", "answer"}] (GQA answers too, keyed by its question ids). --data is what eval
reads: a caption file or folder for captions; VQAv2 / OK-VQA questions + --annotations, or a GQA
questions file, for answers. Every image (question) of the data needs exactly one prediction:
ids missing, extra or repeated are one error each, naming the file, the count and examples.

The shared steps, used by blitext.evaluation.evaluate too: caption_references / vqa_records (the
references, as eval reads them), caption_metrics / vqa_metrics (the metrics dict),
majority_answers (VQA's base rate), coco_id (ids as the results formats write them).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from blitext.atomic import check_out, sha256_file, write_json
from blitext.config import provenance
from blitext.console import say
from blitext.data.parsing import _load_json, _short
from blitext.data.readers import read_image_set
from blitext.data.records import VQARecord
from blitext.data.vqa import read_vqa
from blitext.errors import BlitextError
from blitext.evaluation.compare import beside_scores, print_metrics, say_unscored
from blitext.metrics.vqa import DEFAULT_NORMALISATION, check_normalisation, exact_match, vqa_summary

FORMATS = {"caption": ("image_id", "caption", "image"), "vqa": ("question_id", "answer", "question")}  # id, text, unit
EXAMPLES = 3  # ids an error names


@dataclass
class ScoreConfig:
    predictions: str = ""              # results JSON: COCO [{"image_id", "caption"}] or VQA [{"question_id", "answer"}]
    data: str = ""                     # as eval: caption JSON (or folder); VQAv2 / OK-VQA questions or GQA JSON
    annotations: str | None = None     # vqa: VQAv2 / OK-VQA annotations JSON (the human answers)
    out: str | None = None             # folder of metrics.json; default score-<task>-<data name> beside the predictions
    limit: int | None = None           # only the first N images (questions) of data, as eval --limit N
    tokenizer: str = "auto"            # caption: PTB tokenizer, auto | java | python
    meteor: str = "auto"               # caption: auto (run when Java is there) | java (run or fail) | off
    spice: str = "auto"                # caption: as meteor; SPICE also needs Stanford models downloaded
    vqa_normalise: str = DEFAULT_NORMALISATION  # vqa: official (the script's ground truth) | both (both sides)


# ---------------------------------------------------------------- the two commands

def score_caption(config: ScoreConfig) -> dict:
    """COCO caption metrics of a COCO results file against the captions of `data`."""
    _require(config, "caption")
    refs = caption_references(config.data, config.limit)
    if not refs:
        raise BlitextError(f"{config.data} holds no image with a caption to score against")
    predictions = read_predictions(config.predictions, "caption")
    hyps = dict(zip(refs, matched(predictions, list(refs), config, "caption")))
    metrics, extra = caption_metrics(refs, hyps, config.tokenizer, config.meteor, config.spice)
    return _finish(config, "caption", metrics, {"images": len(refs)}, **extra)


def score_vqa(config: ScoreConfig) -> dict:
    """VQAv2 / OK-VQA accuracy (or GQA exact match) of a VQA results file, with the base rate."""
    _require(config, "vqa")
    normalise = check_normalisation(config.vqa_normalise)
    records = vqa_records(config.data, config.annotations, config.limit)
    if not any(r.answers for r in records):
        raise BlitextError(f"{config.data} holds no answers to score against: pass the VQAv2 / OK-VQA annotations "
                           f"JSON with --annotations")
    predictions = read_predictions(config.predictions, "vqa")
    answers = matched(predictions, [r.question_id for r in records], config, "vqa")
    return _finish(config, "vqa", vqa_metrics(records, answers, normalise), {"questions": len(records)},
                   answer_normalisation=normalise, base_rate=vqa_metrics(records, majority_answers(records), normalise))


def _require(config: ScoreConfig, task: str) -> None:
    for name in ("predictions", "data"):
        if not getattr(config, name):
            raise BlitextError(f"score {task} needs --{name}")
    check_out(config.out)


def _finish(config: ScoreConfig, task: str, metrics: dict, counts: dict, **extra) -> dict:
    """Write metrics.json (eval's record, the predictions' file and sha256 where eval names the
    adaptor), print the table."""
    out = Path(config.out) if config.out else default_score_dir(config, task)
    record = {"task": task, "eval": f"{task}-{Path(config.data).stem}", "metrics": metrics, **extra, "counts": counts,
              "predictions": config.predictions, "predictions_sha256": sha256_file(Path(config.predictions)),
              "data": config.data, "annotations": config.annotations, "provenance": provenance(config)}
    write_json(out / "metrics.json", record)
    sizes = ", ".join(f"{k} {v}" for k, v in counts.items())
    print_metrics(f"score {task}: {Path(config.predictions).name} on {Path(config.data).name} ({sizes})", metrics,
                  beside_scores(record), label="predictions", undefined=extra.get("undefined"))
    say_unscored(extra)
    if "answer_normalisation" in extra:
        say(f"answer normalisation: {extra['answer_normalisation']} (--vqa-normalise official|both)")
    say(f"[green]written[/] {out}/metrics.json")
    return record


def default_score_dir(config: ScoreConfig, task: str) -> Path:
    """score-<task>-<data name> beside the predictions: never eval's own metrics.json."""
    return Path(config.predictions).parent / f"score-{task}-{Path(config.data).stem}"


# ---------------------------------------------------------------- predictions files

def read_predictions(path: str | Path, task: str) -> dict[str, str]:
    """id (a string, as the data readers key them) -> predicted text, from a results JSON list.
    A file that is not such a list, a row without the two keys or with a non-string text, and
    ids given twice are named errors."""
    id_key, text_key, unit = FORMATS[task]
    path = Path(path)
    if not path.is_file():
        raise BlitextError(f"--predictions {path} does not exist: pass the results JSON the system wrote")
    rows = _load_json(path)
    if not isinstance(rows, list):
        raise BlitextError(f"{path}: expected a JSON list of {{\"{id_key}\", \"{text_key}\"}} objects (the official "
                           f"results format), got {_short(rows)}")
    out: dict[str, str] = {}
    repeated: Counter = Counter()
    for n, row in enumerate(rows):
        where = f"{path} row {n}"
        if not isinstance(row, dict) or id_key not in row or text_key not in row:
            raise BlitextError(f"{where}: expected {{\"{id_key}\": ..., \"{text_key}\": \"...\"}}, got {_short(row)}"
                               f"{_other_format(row, task)}")
        key, text = row[id_key], row[text_key]
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise BlitextError(f"{where}: \"{id_key}\" must be an integer or a string, got {_short(key)}")
        if not isinstance(text, str):
            raise BlitextError(f"{where}: \"{text_key}\" must be a string, got {_short(text)}: write the system's "
                               f"{text_key} as text (\"\" for none)")
        if str(key) in out:
            repeated[str(key)] += 1
        out.setdefault(str(key), text)
    if repeated:
        n = len(repeated)
        raise BlitextError(f"{path}: {_count(n, id_key)} {_verb(n, 'appears', 'appear')} more than once "
                           f"({_examples(list(repeated))}): one prediction per {unit}; keep one row of each")
    return out


def _other_format(row, task: str) -> str:
    """A hint when the row is the other task's results format."""
    for other, (id_key, text_key, _) in FORMATS.items():
        if other != task and isinstance(row, dict) and {id_key, text_key} <= set(row):
            return f" (a {other} results row: use score {other})"
    return ""


def matched(predictions: dict[str, str], ids: list[str], config: ScoreConfig, task: str) -> list[str]:
    """The prediction of every id of the data, in the data's order; ids missing or extra are one error."""
    id_key, _, unit = FORMATS[task]
    wanted = set(ids)
    missing = [i for i in ids if i not in predictions]
    extra = [i for i in predictions if i not in wanted]
    data = f"{config.data} (its first {config.limit}, --limit)" if config.limit else config.data
    problems = []
    if missing:
        problems.append(f"{len(missing)} of the {_count(len(ids), unit)} of {data} "
                        f"{_verb(len(missing), 'has', 'have')} no prediction ({_examples(missing)})")
    if extra:
        problems.append(f"{_count(len(extra), id_key)} {_verb(len(extra), 'is', 'are')} not among its {unit}s "
                        f"({_examples(extra)})")
    if problems:
        fix = ("predict every one, or pass the data the predictions were made for (--limit N when they cover only "
               "its first N)" if missing else "pass the data the predictions were made for, or drop those rows")
        raise BlitextError(f"{config.predictions}: " + " and ".join(problems) + f": {fix}")
    return [predictions[i] for i in ids]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _verb(n: int, one: str, many: str) -> str:
    return one if n == 1 else many


def _examples(ids: list[str]) -> str:
    return "e.g. " + ", ".join(ids[:EXAMPLES]) + (", ..." if len(ids) > EXAMPLES else "")


# ---------------------------------------------------------------- shared with eval

def caption_references(data: str, limit: int | None) -> dict[str, list[str]]:
    """Image id -> its non-blank captions, for the images of `data` with one (the first `limit`)."""
    records = [r for r in read_image_set(data).records if any(c.strip() for c in r.captions)]
    records = records[:limit] if limit else records
    return {r.id: [c for c in r.captions if c.strip()] for r in records}


def caption_metrics(refs: dict[str, list[str]], hyps: dict[str, str], tokenizer: str, meteor: str,
                    spice: str) -> tuple[dict, dict]:
    """(metrics, extra): pycocoevalcap's scores and exact_match; extra = {"unavailable", "undefined", "tokenizer"}
    (undefined: metrics whose number measures nothing on these captions, and why)."""
    from blitext.metrics import caption_exact_match, caption_scores  # pycocoevalcap only when captions are scored

    scores = caption_scores(refs, hyps, tokenizer, meteor, spice)
    metrics = {k: v for k, v in scores.as_dict().items() if isinstance(v, float)}
    metrics["exact_match"] = caption_exact_match(refs, hyps)
    return metrics, {"unavailable": scores.unavailable, "undefined": scores.undefined, "tokenizer": scores.tokenizer}


def vqa_records(data: str, annotations: str | None, limit: int | None) -> list[VQARecord]:
    """The questions of `data` (answers from `annotations` or inline), the first `limit`."""
    records = read_vqa(data, annotations)
    records = records[:limit] if limit else records
    if not records:
        raise BlitextError(f"{data} holds no questions")
    return records


def vqa_metrics(records: list[VQARecord], answers: list[str], normalise: str) -> dict:
    """VQAv2 accuracy when questions carry several human answers, GQA exact match when one, none
    when the file has no answers (test-dev: predictions.json goes to the evaluation server)."""
    counts = {len(r.answers) for r in records}
    if counts == {0}:
        say("[yellow]no answers in the data[/] (pass --annotations for VQAv2): only predictions.json is written")
        return {}
    if 0 in counts or (1 in counts and len(counts) > 1):
        bad = next(r for r in records if len(r.answers) != max(counts) or not r.answers)
        raise BlitextError(f"question {bad.question_id} has {len(bad.answers)} answers while others have "
                           f"{max(counts)}: every question needs its human answers (10 in VQAv2, 1 in GQA)")
    if counts == {1}:  # GQA
        hits = [(r.answer_type, exact_match(a, r.answers[0], normalise)) for r, a in zip(records, answers)]
        types = sorted({t for t, _ in hits if t is not None})
        per_type = {t: 100 * _mean([h for u, h in hits if u == t]) for t in types}
        return {"accuracy": 100 * _mean([h for _, h in hits]), "per_answer_type": per_type}
    summary = vqa_summary([{"prediction": a, "answers": r.answers, "answer_type": r.answer_type}
                           for r, a in zip(records, answers)], normalise)
    return {"accuracy": summary["overall"], "per_answer_type": summary["per_answer_type"]}


def majority_answers(records: list[VQARecord]) -> list[str]:
    """Each question answered with its answer type's most common answer (the majority of each
    question's human answers, counted over the questions of that type): the base rate a model
    reaches knowing only the question's type."""
    majority = [Counter(r.answers).most_common(1)[0][0] for r in records]
    by_type: dict = {}
    for r, answer in zip(records, majority):
        by_type.setdefault(r.answer_type, Counter())[answer] += 1
    return [by_type[r.answer_type].most_common(1)[0][0] for r in records]


def coco_id(value: str) -> int | str:
    """Ids as the official results formats write them: integers when they are plain integers."""
    return int(value) if value.isdigit() and str(int(value)) == value else value


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
