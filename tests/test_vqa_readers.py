"""The VQA readers (VQAv2 questions with or without annotations, GQA) and the VQA writer."""
from __future__ import annotations

import json

import pytest

from blitext.data.records import VQARecord
from blitext.data.vqa import read_vqa, write_vqa_json
from blitext.errors import BlitextError
from test_data_readers import write_json


def vqav2_files(tmp_path):
    questions = write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": [
        {"question_id": 4100, "image_id": 41, "question": "What color is the bus?"},
        {"question_id": 4101, "image_id": 41, "question": "Is it raining?", "image": "val/41.jpg"},
    ]})
    annotations = write_json(tmp_path / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 4101, "image_id": 41, "answer_type": "yes/no", "multiple_choice_answer": "no",
         "answers": [{"answer": "no", "answer_id": i + 1} for i in range(10)]},
        {"question_id": 4100, "image_id": 41, "answer_type": "other", "multiple_choice_answer": "red",
         "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(["red"] * 8 + ["orange"] * 2)]},
    ]})
    return questions, annotations


def test_vqav2_questions_with_annotations(tmp_path):
    questions, annotations = vqav2_files(tmp_path)
    records = read_vqa(questions, annotations)
    assert records[0] == VQARecord("4100", "41", "", "What color is the bus?", ("red",) * 8 + ("orange",) * 2, "other")
    assert records[1] == VQARecord("4101", "41", "val/41.jpg", "Is it raining?", ("no",) * 10, "yes/no")
    assert [r.answers for r in read_vqa(questions)] == [(), ()]  # test-dev: questions only


def test_vqav2_annotations_that_do_not_belong_are_refused(tmp_path):
    questions, _ = vqav2_files(tmp_path)
    other = write_json(tmp_path / "other.json", {"annotations": [
        {"question_id": 4100, "image_id": 99, "answers": [{"answer": "x"}]}]})
    with pytest.raises(BlitextError, match="questions\\[0\\]: question_id 4100 is about image 41"):
        read_vqa(questions, other)


def test_vqav2_repeated_question_ids_are_refused_naming_id_and_file(tmp_path):
    questions, annotations = vqav2_files(tmp_path)
    data = json.loads(questions.read_text())
    data["questions"].append(dict(data["questions"][0]))  # would be scored twice
    write_json(questions, data)
    for answers in (annotations, None):
        with pytest.raises(BlitextError, match=r"questions\[2\]: question_id 4100 is listed again "
                                               r"\(first at questions\[0\]\)") as e:
            read_vqa(questions, answers)
        assert str(questions) in str(e.value)
    write_json(questions, {"questions": data["questions"][:2]})
    ann = json.loads(annotations.read_text())
    ann["annotations"].append({**ann["annotations"][1], "answers": [{"answer": "blue"}] * 10})  # replaced the first
    write_json(annotations, ann)
    with pytest.raises(BlitextError, match=r"annotations\[2\]: question_id 4100 is annotated again "
                                           r"\(first at annotations\[1\]\)") as e:
        read_vqa(questions, annotations)
    assert str(annotations) in str(e.value)


def test_gqa_questions(tmp_path):
    path = write_json(tmp_path / "testdev_balanced_questions.json", {
        "20968379": {"imageId": "n288870", "question": "Is the tray on the right?", "answer": "no",
                     "fullAnswer": "No, the tray is on the left.", "types": {"structural": "verify"}},
        "2094": {"imageId": "n1", "question": "What is it?", "answer": "cat"},
    })
    assert read_vqa(path) == [
        VQARecord("20968379", "n288870", "", "Is the tray on the right?", ("no",), "verify"),
        VQARecord("2094", "n1", "", "What is it?", ("cat",), None)]


def test_unknown_vqa_file_is_refused(tmp_path):
    with pytest.raises(BlitextError, match="neither a VQAv2 questions file"):
        read_vqa(write_json(tmp_path / "q.json", [1, 2]))


def test_vqa_writer_round_trips_through_the_reader(tmp_path):
    records = [VQARecord("train-0", "train-0", "images/train/0.png", "what color is the shape?", ("blue",) * 10,
                         "other"),
               VQARecord("train-1", "train-0", "images/train/0.png", "is there a circle?", ("no",) * 10, "yes/no")]
    write_vqa_json(tmp_path / "q.json", tmp_path / "a.json", records)
    assert read_vqa(tmp_path / "q.json", tmp_path / "a.json") == records
    annotations = json.loads((tmp_path / "a.json").read_text())["annotations"]
    assert annotations[0]["multiple_choice_answer"] == "blue" and len(annotations[0]["answers"]) == 10
