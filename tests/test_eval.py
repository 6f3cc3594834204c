"""blitext eval caption and vqa (with VQA's text ceiling), on tiny adaptors trained in adapter_world's
world. Retrieval, compare, refusals and the rest of the command line: test_eval_retrieval.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from blitext.cache import FeatureCache
from blitext.cli.eval import eval_app
from blitext.data.readers import read_image_set
from blitext.errors import BlitextError
from blitext.evaluation.compare import CEILING, compare_runs
from blitext.evaluation.evaluate import answers_current, captions_current, ceiling_verdict, default_captions, eval_caption, eval_vqa
from blitext.evaluation.decoding import GenerationSettings, generate_from_text, generate_texts
from blitext.models.adapter_checkpoint import LoadedAdapter
from blitext.models.loading import load_llm
from blitext.metrics import caption_scores, exact_match, normalize_answer, vqa_accuracy
from adapter_world import FAST, N_IMAGES, common, read, runs, world  # noqa: F401


# ---------------------------------------------------------------- captioning

def stub_captions(monkeypatch, world) -> dict[str, str]:  # noqa: F811
    """Make eval's generation caption each image by what its features are: even images with their
    own first reference, odd ones with a near miss. Metrics are then neither 0 nor 100, and a
    prediction filed under another image would show. Returns image id -> caption."""
    import blitext.evaluation.evaluate as evaluate

    cache = FeatureCache(world["features"])
    records = read_image_set(world["captions"]).records
    wanted = {r.id: r.captions[0] if n % 2 == 0 else "a red square moves left" for n, r in enumerate(records)}
    rows = {key: torch.from_numpy(cache[key]).float() for key in cache.keys}

    def by_features(adapter, llm, features, mask, texts, settings):
        return [wanted[next(k for k, row in rows.items() if torch.equal(row, f.float()))] for f in features]

    monkeypatch.setattr(evaluate, "generate_texts", by_features)
    return wanted


def test_caption_eval_scores_equal_caption_scores_on_its_predictions(world, runs, monkeypatch, tmp_path):  # noqa: F811
    wanted = stub_captions(monkeypatch, world)
    result = eval_caption(common(world, runs, limit=N_IMAGES, tokenizer="python", meteor="off", spice="off"))
    out = runs["s2"] / "eval" / "caption-captions_train"  # the default folder
    metrics, predictions = read(out / "metrics.json"), read(out / "predictions.json")
    assert metrics == result and metrics["counts"] == {"images": N_IMAGES}
    assert metrics["unavailable"] == {"METEOR": "turned off", "SPICE": "turned off"}
    assert metrics["adapter_fingerprint"].startswith("adapter-s2") and metrics["settings"]["num_beams"] == 2
    assert [p["image_id"] for p in predictions] == [f"img{i}" for i in range(N_IMAGES)]
    assert all(p["caption"] == wanted[p["image_id"]] for p in predictions)
    refs = {r.id: list(r.captions) for r in read_image_set(world["captions"]).records[:N_IMAGES]}
    direct = caption_scores(refs, {p["image_id"]: p["caption"] for p in predictions}, "python", "off", "off")
    expected = {k: v for k, v in direct.as_dict().items() if isinstance(v, float)}
    assert set(expected) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    exact = sum(p["caption"].lower().strip(" .") in [c.lower() for c in refs[p["image_id"]]] for p in predictions)
    assert metrics["metrics"] == {**expected, "exact_match": exact / N_IMAGES}
    assert 0 < expected["Bleu_1"] < 1 and exact == N_IMAGES // 2  # scores that a mis-pairing would change
    _recipes_reuse_only_captions_scored_as_now(out, tmp_path)


def _recipes_reuse_only_captions_scored_as_now(folder, tmp_path):
    """A recipe reuses a caption evaluation that lists its undefined metrics, not one made before
    (its BLEU-4 over 3-word captions would be printed as a result), nor a folder without one."""
    assert captions_current(folder) and not captions_current(tmp_path / "nothing-here")
    record = read(folder / "metrics.json")
    del record["undefined"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.json").write_text(json.dumps(record))
    assert not captions_current(tmp_path / "old")


def test_caption_exact_match_ignores_case_punctuation_and_spaces():
    from blitext.metrics import caption_exact_match

    refs = {"a": ["A red circle."], "b": ["a blue square", "the blue square"], "c": ["a red circle"]}
    assert caption_exact_match(refs, {"a": "a  red Circle", "b": "The blue square!", "c": "a red circle on top"}) \
        == pytest.approx(2 / 3)
    with pytest.raises(BlitextError, match="no generated caption"):
        caption_exact_match(refs, {"a": "a red circle"})


# ---------------------------------------------------------------- VQA

QUESTIONS = ["what colour is the shape?", "what shape is it?", "is it red?"]
TYPES = ["other", "other", "yes/no", "number", "yes/no", "number"]


def write_vqav2(folder: Path, answers: list[list[str]] | None) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    questions = [{"question_id": 100 + i, "image_id": f"img{i}", "question": QUESTIONS[i % 3]} for i in range(N_IMAGES)]
    (folder / "questions.json").write_text(json.dumps({"questions": questions}))
    annotations = [{"question_id": 100 + i, "image_id": f"img{i}", "answer_type": TYPES[i],
                    "answers": [{"answer": a, "answer_id": n + 1} for n, a in enumerate(answers[i])]}
                   for i in range(N_IMAGES)] if answers else []
    (folder / "annotations.json").write_text(json.dumps({"annotations": annotations}))
    return folder / "questions.json", folder / "annotations.json"


def test_vqa_accuracy_equals_the_hand_computation_and_gqa_exact_match(tmp_path, world, runs):  # noqa: F811
    questions, _ = write_vqav2(tmp_path / "vqa", None)
    first = eval_vqa(common(world, runs, data=str(questions), out=str(tmp_path / "first")))
    assert first["metrics"] == {}  # no annotations: predictions only (what the test-dev server takes)
    predicted = [p["answer"] for p in read(tmp_path / "first" / "predictions.json")]
    assert len(predicted) == N_IMAGES
    _recipes_reuse_only_answers_decoded_as_now(tmp_path / "first")

    # Image i's question gets i of 10 humans agreeing with the model (decoding is deterministic),
    # in normalised form: the official rule compares the humans' answers (nearly) as written.
    answers = [[normalize_answer(predicted[i])] * i + ["zzqx"] * (10 - i) for i in range(N_IMAGES)]
    questions, annotations = write_vqav2(tmp_path / "vqa", answers)
    result = eval_vqa(common(world, runs, data=str(questions), annotations=str(annotations), out=str(tmp_path / "vqa2")))
    predictions = read(tmp_path / "vqa2" / "predictions.json")
    assert [p["question_id"] for p in predictions] == [100 + i for i in range(N_IMAGES)]  # official format: ints
    assert [p["answer"] for p in predictions] == predicted
    accs = [vqa_accuracy(p["answer"], answers[i]) for i, p in enumerate(predictions)]
    assert accs == pytest.approx([0, 0.3, 0.6, 0.9, 1, 1])
    assert result["metrics"]["accuracy"] == pytest.approx(100 * sum(accs) / len(accs))
    for t in set(TYPES):
        mine = [a for a, u in zip(accs, TYPES) if u == t]
        assert result["metrics"]["per_answer_type"][t] == pytest.approx(100 * sum(mine) / len(mine))

    gqa = {f"g{i}": {"imageId": f"img{i}", "question": QUESTIONS[i % 3], "answer": normalize_answer(predicted[i]) if i % 2 else "zzqx",
                     "types": {"structural": "query" if i < 3 else "verify"}} for i in range(N_IMAGES)}
    (tmp_path / "gqa.json").write_text(json.dumps(gqa))
    g = eval_vqa(common(world, runs, data=str(tmp_path / "gqa.json"), out=str(tmp_path / "gqa")))
    hits = [exact_match(p["answer"], gqa[p["question_id"]]["answer"]) for p in read(tmp_path / "gqa" / "predictions.json")]
    assert g["metrics"]["accuracy"] == pytest.approx(100 * sum(hits) / len(hits)) == pytest.approx(50)
    assert set(g["metrics"]["per_answer_type"]) == {"query", "verify"}


# ---------------------------------------------------------------- VQA's text ceiling

# Human answers with known majorities: per type, "red" (other), "yes" (yes/no), "2" (number)
# win, so the majority-answer base rate can be computed by hand.
CEILING_ANSWERS = [["red"] * 10, ["circle"] * 8 + ["red"] * 2, ["yes"] * 10, ["2"] * 10, ["yes"] * 7 + ["no"] * 3,
                   ["2"] * 6 + ["4"] * 4]
HAND_MAJORITY = {"other": "red", "yes/no": "yes", "number": "2"}


def prepared_vqa(folder: Path, world, captions: bool = True) -> Path:  # noqa: F811
    """blitext data prepare's layout: vqa_test_questions.json (+ annotations), captions_test.json beside it."""
    questions, annotations = write_vqav2(folder, CEILING_ANSWERS)
    questions.rename(folder / "vqa_test_questions.json")
    annotations.rename(folder / "vqa_test_annotations.json")
    if captions:
        (folder / "captions_test.json").write_text(Path(world["captions"]).read_text())
    return folder / "vqa_test_questions.json"


def _recipes_reuse_only_answers_decoded_as_now(folder):
    """A recipe (demo, ablate) reuses a VQA evaluation made with today's decoding, not one made
    before answers stopped starting with a blank token, nor one at other beams."""
    decoding = {k: FAST[k] for k in ("num_beams", "max_new_tokens", "min_new_tokens")}
    assert answers_current(folder, **decoding) and not answers_current(folder, **{**decoding, "num_beams": 3})
    assert not answers_current(folder.parent / "nothing-here", **decoding)
    record = read(folder / "metrics.json")
    del record["settings"]["blank_start"]  # as written before the setting existed
    (folder / "metrics.json").write_text(json.dumps(record))
    assert not answers_current(folder, **decoding)


def test_vqa_text_ceiling_answers_from_each_questions_caption(tmp_path, world, runs):  # noqa: F811
    questions = prepared_vqa(tmp_path / "data", world)
    (tmp_path / "data" / "captions_train.json").write_text("[]")  # another split's file: not the one read
    out = tmp_path / "eval"
    result = eval_vqa(common(world, runs, data=str(questions), annotations=str(questions.parent / "vqa_test_annotations.json"),
                             out=str(out)))
    assert read(out / "metrics.json") == result
    ceiling = result["text_ceiling"]
    assert ceiling["questions"] == N_IMAGES and ceiling["captions"] == str(tmp_path / "data" / "captions_test.json")
    assert ceiling["format"] == "{caption}\nQuestion: {} Short answer:"

    # The ceiling's answers are the LLM's own from [caption of the question's image + "\n"][prompt], with
    # eval's settings and batches, and are scored like the adaptor's.
    llm = load_llm(str(world["llm"]))
    settings = GenerationSettings.for_task("vqa", num_beams=2, max_new_tokens=4, min_new_tokens=1)
    contexts = [f"a {['red', 'blue'][i % 2]} {['circle', 'square'][(i // 2) % 2]}\n" for i in range(N_IMAGES)]
    texts = [f"Question: {QUESTIONS[i % 3]} Short answer:" for i in range(N_IMAGES)]
    direct = [a for s in (0, 4) for a in generate_from_text(llm, contexts[s:s + 4], texts[s:s + 4], settings, "\n")]
    ceiling_answers = [p["answer"] for p in read(out / "ceiling_predictions.json")]
    assert ceiling_answers == direct
    accs = [vqa_accuracy(a, CEILING_ANSWERS[i]) for i, a in enumerate(ceiling_answers)]
    assert ceiling["metrics"]["accuracy"] == pytest.approx(100 * sum(accs) / N_IMAGES)
    assert set(ceiling["metrics"]["per_answer_type"]) == set(TYPES)
    adaptor = [p["answer"] for p in read(out / "predictions.json")]  # predictions.json stays the adaptor's
    assert result["metrics"]["accuracy"] == pytest.approx(
        100 * sum(vqa_accuracy(a, CEILING_ANSWERS[i]) for i, a in enumerate(adaptor)) / N_IMAGES)

    base = [vqa_accuracy(HAND_MAJORITY[t], CEILING_ANSWERS[i]) for i, t in enumerate(TYPES)]
    assert result["base_rate"]["accuracy"] == pytest.approx(100 * sum(base) / N_IMAGES)
    assert result["base_rate"]["accuracy"] < 100  # q1's majority (circle) is not its type's (red)
    near_floor = ceiling["metrics"]["accuracy"] < result["base_rate"]["accuracy"] + 10
    assert result["ceiling_verdict"]["near_floor"] == near_floor
    assert ("cannot answer these questions even from the caption" in result["ceiling_verdict"]["line"]) == near_floor

    rows, _ = compare_runs([out])  # the ceiling and base rate are rows of compare (the demo prints these)
    table = {r[1]: r[2] for r in rows}
    assert table[f"{CEILING}/accuracy"] == ceiling["metrics"]["accuracy"]
    assert table[f"{CEILING}/per_answer_type/yes/no"] == ceiling["metrics"]["per_answer_type"]["yes/no"]
    assert table["majority answer/accuracy"] == result["base_rate"]["accuracy"]
    assert table["accuracy"] == result["metrics"]["accuracy"]


def test_generate_from_text_is_the_adaptor_path_with_the_captions_embeddings(world):  # noqa: F811
    """The ceiling's generation is generate_texts' own, with the caption's token embeddings where
    the soft prompts go, and equals the LLM reading the caption and the prompt as plain tokens."""
    llm = load_llm(str(world["llm"]))
    settings = GenerationSettings.for_task("vqa", num_beams=2, max_new_tokens=4, min_new_tokens=1)
    contexts, texts = ["a red circle\n", "a red square\n"], ["Question: is it red? Short answer:"] * 2
    ids = [llm.tokenizer(c, add_special_tokens=False, return_tensors="pt").input_ids[0] for c in contexts]
    assert len(ids[0]) == len(ids[1]) and not torch.equal(ids[0], ids[1])  # one (B, P) tensor of prompts
    embeds = llm.embed(torch.stack(ids)).detach()

    class CaptionPrompts(torch.nn.Module):
        def prompts(self, features, mask):
            return embeds

    adapter = LoadedAdapter(CaptionPrompts(), None, {"config": {"end_of_text": "\n"}}, "test", Path("."))
    from_text = generate_from_text(llm, contexts, texts, settings, "\n")
    assert generate_texts(adapter, llm, torch.zeros(2, 1, 4), None, texts, settings) == from_text
    for context, text, answer in zip(contexts, texts, from_text):  # as plain input ids, one at a time
        tokens = llm.tokenizer(context, add_special_tokens=False).input_ids + \
            llm.tokenizer(text, add_special_tokens=False).input_ids
        out = llm.model.generate(torch.tensor([tokens]), attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
                                 num_beams=2, max_new_tokens=4, min_new_tokens=1, length_penalty=-1.0, do_sample=False,
                                 eos_token_id=[llm.tokenizer("\n", add_special_tokens=False).input_ids[-1],
                                               llm.tokenizer.eos_token_id], pad_token_id=llm.tokenizer.pad_token_id)
        new = llm.tokenizer.decode(out[0, len(tokens):], skip_special_tokens=True)
        assert new.split("\n")[0].strip() == answer


def test_vqa_text_ceiling_unavailable_says_why(tmp_path, world, runs):  # noqa: F811
    questions = prepared_vqa(tmp_path / "data", world, captions=False)
    annotations = str(questions.parent / "vqa_test_annotations.json")
    result = eval_vqa(common(world, runs, data=str(questions), annotations=annotations, out=str(tmp_path / "none")))
    assert "no captions: pass --captions" in result["text_ceiling"]["unavailable"]
    assert result["ceiling_verdict"] is None and not (tmp_path / "none" / "ceiling_predictions.json").exists()
    assert result["metrics"]["accuracy"] >= 0 and result["base_rate"]["accuracy"] > 0  # the rest is still scored

    partial = tmp_path / "five.json"  # img5 has no caption
    partial.write_text(json.dumps([e for e in read(world["captions"]) if e["image_id"] != "img5"]))
    result = eval_vqa(common(world, runs, data=str(questions), annotations=annotations, captions=str(partial),
                             out=str(tmp_path / "five")))
    assert result["text_ceiling"] == {"unavailable": f"1 of {N_IMAGES} questions are about images with no "
                                                     f"caption in {partial} (first: 'img5')"}
    with pytest.raises(BlitextError, match="--captions: .*nowhere.json does not exist"):
        eval_vqa(common(world, runs, data=str(questions), captions=str(tmp_path / "nowhere.json"),
                        out=str(tmp_path / "x")))


def test_ceiling_verdict_needs_10_points_above_the_base_rate():
    base = {"accuracy": 40.0}
    assert ceiling_verdict({"metrics": {"accuracy": 49.9}}, base)["near_floor"]
    assert "cannot show anything about the adaptor" in ceiling_verdict({"metrics": {"accuracy": 49.9}}, base)["line"]
    assert not ceiling_verdict({"metrics": {"accuracy": 50.0}}, base)["near_floor"]
    assert ceiling_verdict({"unavailable": "no captions"}, base) is None


def test_default_captions_are_the_questions_split(tmp_path):
    (tmp_path / "vqa_test_questions.json").write_text("{}")
    assert default_captions(tmp_path / "vqa_test_questions.json") is None
    for split in ("train", "test", "val"):
        (tmp_path / f"captions_{split}.json").write_text("[]")
    assert default_captions(tmp_path / "vqa_test_questions.json") == tmp_path / "captions_test.json"
    assert default_captions(tmp_path / "vqa_val_questions.json") == tmp_path / "captions_val.json"
    assert default_captions(tmp_path / "questions.json") is None


def test_cli_vqa_prints_the_ceiling_beside_the_score(tmp_path, world, runs):  # noqa: F811
    app = typer.Typer()
    app.add_typer(eval_app, name="eval")
    questions = prepared_vqa(tmp_path / "data", world, captions=False)
    help_text = CliRunner().invoke(app, ["eval", "vqa", "--help"], env={"COLUMNS": "250"}).output
    help_text = " ".join(help_text.replace("│", " ").split())  # the option table wraps its lines
    assert "--captions" in help_text and "[default: captions_<split>.json beside the questions file" in help_text
    r = CliRunner().invoke(app, ["eval", "vqa", "--adapter", str(runs["s2"]), "--features", str(world["features"]),
                                 "--data", str(questions), "--annotations", str(tmp_path / "data" / "vqa_test_annotations.json"),
                                 "--captions", str(world["captions"]), "--num-beams", "1", "--max-new-tokens", "2",
                                 "--device", "cpu", "--out", str(tmp_path / "out")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    metrics = read(tmp_path / "out" / "metrics.json")
    assert metrics["text_ceiling"]["captions"] == str(world["captions"])
    assert CEILING in r.output and "majority answer" in r.output and metrics["ceiling_verdict"]["line"][:40] in r.output

