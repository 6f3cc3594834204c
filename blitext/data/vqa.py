"""VQA data: VQAv2 question + annotation files (also OK-VQA's), GQA question files, and the writer.

Image references on questions (blitext's own files carry an "image" field) obey the same
root rule as caption files: they may not leave the dataset folder.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from blitext.atomic import write_json
from blitext.data.parsing import _load_json, _RefChecker, _short
from blitext.data.records import VQARecord
from blitext.errors import BlitextError


def read_vqa(questions_json: str | Path, annotations_json: str | Path | None = None,
             image_root: str | Path | None = None) -> list[VQARecord]:
    """VQAv2 questions (+ annotations for answers), or a GQA questions file (answers inline)."""
    questions_json = Path(questions_json)
    data = _load_json(questions_json)
    check = _RefChecker(Path(image_root) if image_root else questions_json.parent)
    if isinstance(data, dict) and isinstance(data.get("questions"), list):
        answers = _vqav2_answers(Path(annotations_json)) if annotations_json else None
        records = [_vqav2_record(q, answers, check, f"{questions_json} questions[{i}]", annotations_json)
                   for i, q in enumerate(data["questions"])]
        _refuse_repeated_questions(records, questions_json)
        return records
    first = next(iter(data.values()), None) if isinstance(data, dict) else None
    if isinstance(first, dict) and "question" in first:
        if annotations_json:
            raise BlitextError(f"{questions_json} is a GQA file, which carries its answers inline; "
                               f"do not pass an annotations file ({annotations_json})")
        return [_gqa_record(qid, q, f"{questions_json} question {qid!r}") for qid, q in data.items()]
    raise BlitextError(f"{questions_json}: neither a VQAv2 questions file ({{\"questions\": [...]}}) nor a GQA "
                       f"questions file ({{question_id: {{\"imageId\", \"question\", \"answer\"}}}})")


def _vqav2_answers(path: Path) -> dict[str, tuple[str, tuple[str, ...], str | None]]:
    """question_id -> (image_id, human answers, answer_type)."""
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise BlitextError(f"{path}: not a VQAv2 annotations file (expected {{\"annotations\": [...]}})")
    out, first_row = {}, {}
    for row, ann in enumerate(data["annotations"]):
        where = f"{path} annotations[{row}]"
        qid, entry = _vqav2_annotation(ann, where)
        if qid in out:  # a dict would keep the last silently: which answers are right is the user's call
            raise BlitextError(f"{where}: question_id {qid} is annotated again (first at "
                               f"annotations[{first_row[qid]}]); keep one annotation per question, remove the other")
        out[qid], first_row[qid] = entry, row
    return out


def _vqav2_annotation(ann: Any, where: str) -> tuple[str, tuple[str, tuple[str, ...], str | None]]:
    """One annotation: (question_id, (image_id, human answers, answer_type))."""
    if not isinstance(ann, dict) or "question_id" not in ann:
        raise BlitextError(f"{where}: expected {{\"question_id\", \"answers\", ...}}, got {_short(ann)}")
    raw = ann.get("answers") or []
    if not isinstance(raw, list) or not all(isinstance(a, dict) and "answer" in a for a in raw):
        raise BlitextError(f"{where}: \"answers\" must be a list of {{\"answer\": ...}}, got {_short(raw)}")
    answers = tuple(str(a["answer"]) for a in raw)
    if not answers and ann.get("multiple_choice_answer") is not None:
        answers = (str(ann["multiple_choice_answer"]),)
    return str(ann["question_id"]), (str(ann.get("image_id")), answers, ann.get("answer_type"))


def _refuse_repeated_questions(records: list[VQARecord], path: Path) -> None:
    """A question listed twice would be scored twice, weighting it double in the accuracy."""
    first: dict[str, int] = {}
    for row, r in enumerate(records):
        earlier = first.setdefault(r.question_id, row)
        if earlier != row:
            raise BlitextError(f"{path} questions[{row}]: question_id {r.question_id} is listed again (first at "
                               f"questions[{earlier}]); each question must appear once: remove the repeat")


def _vqav2_record(q: Any, answers: dict | None, check: _RefChecker, where: str,
                  annotations_json: Any) -> VQARecord:
    if not isinstance(q, dict) or not {"question_id", "image_id", "question"} <= set(q):
        raise BlitextError(f"{where}: expected {{\"question_id\", \"image_id\", \"question\"}}, got {_short(q)}")
    qid, image_id = str(q["question_id"]), str(q["image_id"])
    image = check(q["image"], where) if q.get("image") else ""
    if answers is None:
        return VQARecord(qid, image_id, image, str(q["question"]), ())
    if qid not in answers:
        raise BlitextError(f"{where}: question_id {qid} has no entry in {annotations_json}; "
                           f"pass the annotations file that belongs to these questions")
    ann_image_id, human, answer_type = answers[qid]
    if ann_image_id != image_id:
        raise BlitextError(f"{where}: question_id {qid} is about image {image_id} but {annotations_json} "
                           f"says image {ann_image_id}; the two files do not belong together")
    return VQARecord(qid, image_id, image, str(q["question"]), human, answer_type)


def _gqa_record(qid: str, q: Any, where: str) -> VQARecord:
    if not isinstance(q, dict) or "imageId" not in q or "question" not in q:
        raise BlitextError(f"{where}: expected {{\"imageId\", \"question\", \"answer\"}}, got {_short(q)}")
    answers = (str(q["answer"]),) if q.get("answer") is not None else ()
    types = q.get("types")
    answer_type = types.get("structural") if isinstance(types, dict) else None
    return VQARecord(str(qid), str(q["imageId"]), "", str(q["question"]), answers, answer_type)


def write_vqa_json(questions_path: str | Path, annotations_path: str | Path,
                   vqa_records: Iterable[VQARecord]) -> None:
    """VQAv2's two files; each question also carries blitext's "image" reference."""
    questions, annotations = [], []
    for r in vqa_records:
        q = {"question_id": r.question_id, "image_id": r.image_id, "question": r.question}
        questions.append({**q, "image": r.image} if r.image else q)
        annotations.append({
            "question_id": r.question_id, "image_id": r.image_id, "answer_type": r.answer_type,
            "multiple_choice_answer": Counter(r.answers).most_common(1)[0][0] if r.answers else None,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(r.answers)],
        })
    write_json(Path(questions_path), {"task_type": "Open-Ended", "questions": questions})
    write_json(Path(annotations_path), {"annotations": annotations})
