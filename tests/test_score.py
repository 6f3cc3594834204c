"""blitext score caption|vqa: any system's predictions scored by eval's own metric code.

The first tests use hand-written predictions and references (no model); the last ones run a tiny
eval (adapter_world's runs, as test_eval's) and score its predictions.json, which must give its metrics.json."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blitext.cli.score import score_app
from blitext.errors import BlitextError
from blitext.evaluation.evaluate import eval_caption, eval_vqa
from blitext.evaluation.score import ScoreConfig, score_caption, score_vqa
from adapter_world import N_IMAGES, common, runs, world  # noqa: F401  (fixtures of the eval tests)
from test_eval import stub_captions, write_vqav2
from test_metrics import PYTHON_TOLERANCE, VECTOR_EXPECTED, VECTOR_HYPS, VECTOR_REFS

CAPTION_KEYS = {"bleu_1": "Bleu_1", "bleu_2": "Bleu_2", "bleu_3": "Bleu_3", "bleu_4": "Bleu_4", "rouge_l": "ROUGE_L",
                "cider": "CIDEr"}

# Three questions where the two ground-truth rules disagree (docs/method.md#vqa-accuracy):
# "two" against ten "two": the official rule compares the unanimous answers untouched, so the
# prediction's "2" never matches; "yes!" gets the punctuation step only ("yes "); "Red." matches
# 3 of 10 humans either way (0.9).
ANSWERS = [["two"] * 10, ["yes!"] * 9 + ["no"], ["red"] * 3 + ["blue"] * 7]
TYPES = ["number", "yes/no", "other"]
PREDICTED = ["two", "yes", "Red."]
OFFICIAL = {"accuracy": 100 * 0.9 / 3, "per_answer_type": {"number": 0.0, "yes/no": 0.0, "other": 90.0}}
BOTH = {"accuracy": 100 * 2.9 / 3, "per_answer_type": {"number": 100.0, "yes/no": 100.0, "other": 90.0}}


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def vqa_files(folder: Path) -> tuple[Path, Path]:
    questions = [{"question_id": 1 + i, "image_id": 10 + i, "question": "?"} for i in range(len(ANSWERS))]
    annotations = [{"question_id": 1 + i, "image_id": 10 + i, "answer_type": TYPES[i],
                    "answers": [{"answer": a, "answer_id": n + 1} for n, a in enumerate(ANSWERS[i])]}
                   for i in range(len(ANSWERS))]
    return (write(folder / "vqa_val_questions.json", {"questions": questions}),
            write(folder / "vqa_val_annotations.json", {"annotations": annotations}))


def vqa_predictions(path: Path, rows=None) -> Path:
    return write(path, rows if rows is not None else
                 [{"question_id": 1 + i, "answer": a} for i, a in enumerate(PREDICTED)])


def vqa_config(tmp_path: Path, predictions: Path, **kw) -> ScoreConfig:
    questions, annotations = vqa_files(tmp_path / "data")
    return ScoreConfig(**{"predictions": str(predictions), "data": str(questions), "annotations": str(annotations),
                          "out": str(tmp_path / "out"), **kw})


def caption_files(tmp_path: Path) -> tuple[Path, Path]:
    """The reference test vector (docs/method.md#caption-metrics-test-vector) as COCO captions and results."""
    data = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in VECTOR_REFS],
            "annotations": [{"image_id": i, "caption": c} for i, refs in VECTOR_REFS.items() for c in refs]}
    results = [{"image_id": i, "caption": h} for i, h in VECTOR_HYPS.items()]
    return write(tmp_path / "captions_val.json", data), write(tmp_path / "results.json", results)


def caption_config(tmp_path: Path, predictions: Path, **kw) -> ScoreConfig:
    return ScoreConfig(**{"predictions": str(predictions), "data": str(tmp_path / "captions_val.json"),
                          "out": str(tmp_path / "out"), "tokenizer": "python", "meteor": "off", "spice": "off", **kw})


# ---------------------------------------------------------------- hand-written predictions

def test_score_caption_gives_the_reference_vector(tmp_path):
    data, predictions = caption_files(tmp_path)
    record = score_caption(caption_config(tmp_path, predictions))
    for name, key in CAPTION_KEYS.items():
        assert record["metrics"][key] == pytest.approx(VECTOR_EXPECTED[name], abs=PYTHON_TOLERANCE), key
    assert record["metrics"]["exact_match"] == 0.0
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written == record and record["counts"] == {"images": 3} and record["eval"] == "caption-captions_val"
    assert record["predictions_sha256"] == hashlib.sha256(predictions.read_bytes()).hexdigest()
    assert record["unavailable"] == {"METEOR": "turned off", "SPICE": "turned off"}
    assert record["provenance"]["config"]["predictions"] == str(predictions) and record["data"] == str(data)


def test_a_bleu_that_measures_nothing_reads_n_a_with_its_reason(tmp_path, capsys):
    """Exact 3-word captions: BLEU-4 is pycocoevalcap's 0.0316 in metrics.json, n/a in every table."""
    from blitext.evaluation.compare import VOID, compare_runs, print_compare, void_notes

    data = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in (1, 2)],
            "annotations": [{"image_id": 1, "caption": "a red circle"}, {"image_id": 2, "caption": "a blue square"}]}
    write(tmp_path / "captions_val.json", data)
    predictions = write(tmp_path / "results.json", [{"image_id": 1, "caption": "a red circle"},
                                                     {"image_id": 2, "caption": "a blue square"}])
    record = score_caption(caption_config(tmp_path, predictions))
    assert record["metrics"]["Bleu_4"] == pytest.approx(0.0316, abs=1e-4) and record["metrics"]["exact_match"] == 1.0
    assert list(record["undefined"]) == ["Bleu_4"]
    assert "Bleu_4 n/a: no reference caption has 4 words" in " ".join(capsys.readouterr().err.split())
    rows, columns = compare_runs([tmp_path / "out"])
    table = {r[1]: r[2] for r in rows}
    assert table["Bleu_4"] == VOID and table["Bleu_3"] == pytest.approx(1.0) and void_notes(rows) == record["undefined"]
    print_compare(rows, columns)
    printed = capsys.readouterr().err
    assert "0.0316" not in printed and "Bleu_4 n/a" in " ".join(printed.split())


def test_the_two_answer_rules_give_their_own_accuracy_and_metrics_json_names_the_rule(tmp_path):
    predictions = vqa_predictions(tmp_path / "results.json")
    default = score_vqa(vqa_config(tmp_path, predictions))
    assert default["answer_normalisation"] == "official"  # the default: numbers as in papers
    assert default["metrics"]["accuracy"] == pytest.approx(OFFICIAL["accuracy"])
    assert default["metrics"]["per_answer_type"] == pytest.approx(OFFICIAL["per_answer_type"])
    both = score_vqa(vqa_config(tmp_path, predictions, vqa_normalise="both", out=str(tmp_path / "both")))
    assert both["answer_normalisation"] == "both"
    assert both["metrics"]["accuracy"] == pytest.approx(BOTH["accuracy"])
    assert both["metrics"]["per_answer_type"] == pytest.approx(BOTH["per_answer_type"])
    for folder, rule in (("out", "official"), ("both", "both")):
        written = json.loads((tmp_path / folder / "metrics.json").read_text())
        assert written["answer_normalisation"] == rule == written["provenance"]["config"]["vqa_normalise"]
        assert written["counts"] == {"questions": 3} and "base_rate" in written
    with pytest.raises(BlitextError, match=r"--vqa-normalise.*'quirk' is unknown: use official"):
        score_vqa(vqa_config(tmp_path, predictions, vqa_normalise="quirk"))


def test_gqa_answers_are_scored_with_the_rule(tmp_path):
    gqa = {"g1": {"imageId": "i1", "question": "?", "answer": "t-shirt"},
           "g2": {"imageId": "i2", "question": "?", "answer": "dog"}}
    data = write(tmp_path / "gqa.json", gqa)
    predictions = write(tmp_path / "results.json", [{"question_id": "g1", "answer": "t-shirt"},
                                                    {"question_id": "g2", "answer": "The dog."}])
    official = score_vqa(ScoreConfig(predictions=str(predictions), data=str(data), out=str(tmp_path / "a")))
    both = score_vqa(ScoreConfig(predictions=str(predictions), data=str(data), out=str(tmp_path / "b"),
                                 vqa_normalise="both"))
    assert official["metrics"]["accuracy"] == 50.0 and both["metrics"]["accuracy"] == 100.0  # "t shirt" != "t-shirt"


@pytest.mark.parametrize("rows, error", [
    ([{"question_id": 1, "answer": "two"}],
     r"results.json: 2 of the 3 questions of .*vqa_val_questions.json have no prediction \(e.g. 2, 3\): predict every"),
    ([{"question_id": i, "answer": "x"} for i in (1, 2, 3, 7, 8, 9, 10)],
     r"results.json: 4 question_ids are not among its questions \(e.g. 7, 8, 9, \.\.\.\): pass the data the"),
    ([{"question_id": 1, "answer": "x"}, {"question_id": 9, "answer": "x"}],
     r"2 of the 3 questions .* \(e.g. 2, 3\) and 1 question_id is not among its questions \(e.g. 9\)"),
    ([{"question_id": i, "answer": "x"} for i in (1, 2, 3)] + [{"question_id": "2", "answer": "y"},
                                                             {"question_id": 3, "answer": "z"}],
     r"results.json: 2 question_ids appear more than once \(e.g. 2, 3\): one prediction per question; keep one"),
])
def test_ids_missing_extra_or_repeated_are_one_named_error(tmp_path, rows, error):
    predictions = vqa_predictions(tmp_path / "results.json", rows)
    with pytest.raises(BlitextError, match=error):
        score_vqa(vqa_config(tmp_path, predictions))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, error", [
    ("[{", r"results.json: not valid JSON \(line 1"),
    ({"1": "two"}, r"results.json: expected a JSON list of \{\"question_id\", \"answer\"\} objects"),
    ([{"question_id": 1, "answer": "a"}, {"image_id": 2, "caption": "b"}],
     r"results.json row 1: expected \{\"question_id\": \.\.\., \"answer\": .*\(a caption results row: use score caption\)"),
    ([{"question_id": 1, "answer": 2}], r"results.json row 0: \"answer\" must be a string, got 2"),
    ([{"question_id": 1, "answer": None}], r"results.json row 0: \"answer\" must be a string, got None"),
    ([{"question_id": [1], "answer": "a"}], r"results.json row 0: \"question_id\" must be an integer or a string"),
    (["two"], r"results.json row 0: expected"),
])
def test_malformed_prediction_files_name_the_file_and_row(tmp_path, content, error):
    predictions = vqa_predictions(tmp_path / "results.json", content)
    with pytest.raises(BlitextError, match=error):
        score_vqa(vqa_config(tmp_path, predictions))


def test_caption_ids_are_checked_and_limit_scores_the_first_n(tmp_path):
    caption_files(tmp_path)
    one = write(tmp_path / "one.json", [{"image_id": 1, "caption": VECTOR_HYPS[1]}])
    with pytest.raises(BlitextError, match=r"one.json: 2 of the 3 images of .*captions_val.json have no prediction "
                                           r"\(e.g. 2, 3\).*--limit N"):
        score_caption(caption_config(tmp_path, one))
    assert score_caption(caption_config(tmp_path, one, limit=1))["counts"] == {"images": 1}
    with pytest.raises(BlitextError, match=r"row 0: \"caption\" must be a string, got \['a'\]"):
        score_caption(caption_config(tmp_path, write(tmp_path / "bad.json", [{"image_id": 1, "caption": ["a"]}])))


def test_vqa_without_answers_asks_for_the_annotations(tmp_path):
    predictions = vqa_predictions(tmp_path / "results.json")
    config = vqa_config(tmp_path, predictions)
    config.annotations = None
    with pytest.raises(BlitextError, match="holds no answers to score against: .*--annotations"):
        score_vqa(config)


def test_score_cli(tmp_path):
    predictions = vqa_predictions(tmp_path / "results.json")
    questions, annotations = vqa_files(tmp_path / "data")
    args = ["vqa", "--predictions", str(predictions), "--data", str(questions), "--annotations", str(annotations)]
    result = CliRunner().invoke(score_app, args + ["--vqa-normalise", "both", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "answer normalisation: both" in result.output
    written = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert written["metrics"]["accuracy"] == pytest.approx(BOTH["accuracy"])
    default = CliRunner().invoke(score_app, args)  # default folder: beside the predictions
    assert default.exit_code == 0, default.output
    written = json.loads((tmp_path / "score-vqa-vqa_val_questions" / "metrics.json").read_text())
    assert written["answer_normalisation"] == "official"
    bad = vqa_predictions(tmp_path / "short.json", [{"question_id": 1, "answer": "two"}])
    result = CliRunner().invoke(score_app, ["vqa", "--predictions", str(bad), "--data", str(questions),
                                            "--annotations", str(annotations)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "error:" in result.output and "2 of the 3 questions" in result.output


def test_score_help_shows_the_defaults():
    for command, expected in (("vqa", ["[default: official]", "[default: score-<task>-<data name> beside the"]),
                              ("caption", ["[default: auto]"])):
        result = CliRunner().invoke(score_app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.replace("│", " ").split())
        assert all(e in text for e in expected), text
    assert ScoreConfig().vqa_normalise == "official"


# ---------------------------------------------------------------- eval's own predictions

def test_score_of_evals_predictions_is_evals_metrics(tmp_path, world, runs, monkeypatch):  # noqa: F811
    metric_options = dict(tokenizer="python", meteor="off", spice="off")
    with monkeypatch.context() as m:  # captions whose scores are neither 0 nor perfect
        stub_captions(m, world)
        evaluated = eval_caption(common(world, runs, limit=N_IMAGES, out=str(tmp_path / "caption"), **metric_options))
    assert 0 < evaluated["metrics"]["Bleu_1"] < 1 and 0 < evaluated["metrics"]["CIDEr"]
    scored = score_caption(ScoreConfig(predictions=str(tmp_path / "caption" / "predictions.json"),
                                       data=str(world["captions"]), limit=N_IMAGES, out=str(tmp_path / "s1"),
                                       **metric_options))
    for key in ("task", "eval", "metrics", "unavailable", "tokenizer", "counts"):
        assert scored[key] == evaluated[key], key

    questions, _ = write_vqav2(tmp_path / "vqa", None)
    eval_vqa(common(world, runs, data=str(questions), out=str(tmp_path / "first")))
    predicted = [p["answer"] for p in json.loads((tmp_path / "first" / "predictions.json").read_text())]
    # Human answers that tell the rules apart: i agree with the model, the rest are its answer
    # with a "!" the official rule turns into a trailing space, so only --vqa-normalise both counts them.
    answers = [[predicted[i]] * i + [predicted[i] + "!"] * (10 - i) for i in range(N_IMAGES)]
    questions, annotations = write_vqav2(tmp_path / "vqa", answers)
    accuracy = {}
    for rule in ("official", "both"):
        evaluated = eval_vqa(common(world, runs, data=str(questions), annotations=str(annotations),
                                    out=str(tmp_path / f"eval-{rule}"), vqa_normalise=rule))
        scored = score_vqa(ScoreConfig(predictions=str(tmp_path / f"eval-{rule}" / "predictions.json"),
                                       data=str(questions), annotations=str(annotations),
                                       out=str(tmp_path / f"score-{rule}"), vqa_normalise=rule))
        for key in ("task", "eval", "metrics", "base_rate", "answer_normalisation", "counts"):
            assert scored[key] == evaluated[key], (rule, key)
        assert evaluated["answer_normalisation"] == rule
        accuracy[rule] = evaluated["metrics"]["accuracy"]
    assert accuracy["official"] < accuracy["both"] == 100.0  # both: every human agrees once normalised
