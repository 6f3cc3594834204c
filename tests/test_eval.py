"""blitext eval caption|vqa|retrieval and compare, on tiny adaptors trained on the test_adapter world."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from blitext.adapter.image import train_adapter
from blitext.models.adapter_checkpoint import load_adapter
from blitext.cache import FeatureCache
from blitext.cli.eval import compare_cmd, eval_app
from blitext.data.readers import read_image_set
from blitext.data.text import caption_key
from blitext.errors import BlitextError
from blitext.evaluation.compare import CEILING, compare_runs
from blitext.evaluation.evaluate import EvalConfig, ceiling_verdict, default_captions, eval_caption, eval_retrieval, eval_vqa
from blitext.features.image import ExtractConfig, extract_features
from blitext.evaluation.decoding import GenerationSettings, generate_from_text, generate_texts
from blitext.models.adapter_checkpoint import LoadedAdapter
from blitext.models.loading import load_llm
from blitext.metrics import caption_scores, exact_match, normalize_answer, vqa_accuracy
from test_adapter import config, world  # noqa: F401

FAST = dict(num_beams=2, max_new_tokens=4, min_new_tokens=1, batch_size=4, device="cpu")  # tiny decoding
N_IMAGES = 6  # images 0..5 have 8 captions: at most 10 candidates each way


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory) -> dict:  # noqa: F811
    root = tmp_path_factory.mktemp("eval-runs")
    train_adapter(config(world, root / "s1", max_steps=2))
    train_adapter(config(world, root / "s2", stage=2, max_steps=2, init=str(root / "s1")))
    train_adapter(config(world, root / "s1-plain", max_steps=1, w_align=0.0))  # llm_proj never met the LLM
    return {"s1": root / "s1", "s2": root / "s2", "s1_plain": root / "s1-plain"}


def common(world, runs, **kw) -> EvalConfig:  # noqa: F811
    values = dict(adapter=str(runs["s2"]), features=str(world["features"]), data=str(world["captions"]), **FAST)
    return EvalConfig(**{**values, **kw})


def read(path: Path):
    return json.loads(path.read_text())


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


def test_caption_eval_scores_equal_caption_scores_on_its_predictions(world, runs, monkeypatch):  # noqa: F811
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


# ---------------------------------------------------------------- retrieval

@pytest.fixture(scope="module")
def retrieval(world, runs, tmp_path_factory) -> dict:  # noqa: F811
    root = tmp_path_factory.mktemp("retrieval")
    return {k: eval_retrieval(common(world, runs, adapter=str(runs["s1"]), limit=N_IMAGES, k=k, out=str(root / f"k{k}")))
            | {"out": root / f"k{k}"} for k in (1, 3, 128)}


def itc_and_itm(world, runs):  # noqa: F811
    """The test's own ITC matrix and ITM matrix (n_images, n_texts), from the raw Q-Former calls."""
    adapter = load_adapter(runs["s1"])
    model = adapter.model
    records = read_image_set(world["captions"]).records[:N_IMAGES]
    texts = [c for r in records for c in r.captions]
    feats, mask = FeatureCache(world["features"]).get_batch([r.id for r in records])
    tok = adapter.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = F.normalize(model.vision_proj(model.query_output(feats.float(), mask)), dim=-1)  # (N, Q, E)
        text = F.normalize(model.text_proj(model.text_output(tok.input_ids, tok.attention_mask)[:, 0]), dim=-1)
        itc = torch.einsum("iqe,te->iqt", image, text).max(1).values
        q = model.n_prompt
        att = torch.cat([torch.ones(len(texts), q, dtype=torch.long), tok.attention_mask], 1)
        itm = torch.stack([model.itm_head(model.joint_output(tok.input_ids, feats[i:i + 1].float().expand(len(texts), -1, -1),
                                                             att)[:, :q])[..., 1].mean(1) for i in range(len(records))])
    keys = [caption_key(r.id, n) for r in records for n in range(len(r.captions))]
    return itc, itm, keys


def reranked(itc: list[float], both: list[float], k: int, tol: float = 1e-5) -> bool:
    """Scores of one query's candidates in predicted order: the first k are ITC's k best, ordered by
    ITM + ITC (`both`); the rest keep ITC's descending order (up to the float noise of a different
    batching)."""
    head, tail = itc[:k], itc[k:]
    return descending(both[:k], tol) and descending(tail, tol) and (not tail or min(head) >= max(tail) - tol)


def descending(scores: list[float], tol: float = 1e-5) -> bool:
    return all(a >= b - tol for a, b in zip(scores, scores[1:]))


def test_retrieval_reranks_only_inside_the_top_k(world, runs, retrieval):  # noqa: F811
    itc, itm, keys = itc_and_itm(world, runs)
    assert itc.shape == itm.shape == (N_IMAGES, 8)
    # images rank the texts differently, and ITM reorders ITC: a misrouted query or score would show
    assert len({tuple(row.argsort().tolist()) for row in itc}) > 1
    assert len({tuple(row.argsort().tolist()) for row in itm + itc}) > 1
    both = itm + itc
    for k in (1, 3, 128):
        result = retrieval[k]
        m = result["metrics"]
        assert all(0 <= m[f"{d}_r{n}"] <= 100 for d in ("txt", "img") for n in (1, 5, 10))
        assert m["txt_r10"] == m["img_r10"] == 100  # <= 10 candidates each way
        assert result["counts"] == {"images": N_IMAGES, "texts": 8, "k": min(k, 8)}
        predictions = read(result["out"] / "predictions.json")
        for i, row in enumerate(predictions["image_to_text"]):
            assert sorted(row["top10"]) == sorted(keys)
            order = [keys.index(t) for t in row["top10"]]
            assert reranked(itc[i, order].tolist(), both[i, order].tolist(), k), (k, i, row)
        for j, row in enumerate(predictions["text_to_image"]):
            order = [int(x[3:]) for x in row["top10"]]
            assert reranked(itc[order, j].tolist(), both[order, j].tolist(), k), (k, j, row)
    top = read(retrieval[128]["out"] / "predictions.json")["image_to_text"][0]["top10"]
    assert top != read(retrieval[1]["out"] / "predictions.json")["image_to_text"][0]["top10"]  # ITM did reorder


def test_compare_runs_lines_up_two_metric_folders(retrieval):
    rows, columns = compare_runs([retrieval[1]["out"], retrieval[128]["out"]])
    assert columns == ["eval", "metric", "k1", "k128"]
    table = {(r[0], r[1]): r[2:] for r in rows}
    assert table[("retrieval-captions_train", "txt_r1")] == [retrieval[1]["metrics"]["txt_r1"],
                                                           retrieval[128]["metrics"]["txt_r1"]]
    assert len(rows) == len(retrieval[1]["metrics"])  # every numeric metric, once
    with pytest.raises(BlitextError, match="holds no metrics.json"):
        compare_runs([retrieval[1]["out"].parent])


# ---------------------------------------------------------------- refusals and the command line

def test_refusals_are_one_line_errors(tmp_path, world, runs, vision_folders):  # noqa: F811
    app = typer.Typer()
    app.add_typer(eval_app, name="eval")
    runner = CliRunner()
    other = tmp_path / "features-clip"
    extract_features(ExtractConfig(data=str(world["captions"]), out=str(other), vision_encoder=str(vision_folders["clip"]),
                                   batch_size=8, shard_size=16, num_workers=0, device="cpu"))
    r = runner.invoke(app, ["eval", "caption", "--adapter", str(runs["s2"]), "--features", str(other),
                            "--data", str(world["captions"])])
    assert r.exit_code == 2 and "this run expects" in r.output and "extract-features" in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    with pytest.raises(BlitextError, match="stage-1 adaptor"):
        eval_caption(common(world, runs, adapter=str(runs["s1_plain"]), out=str(tmp_path / "s1")))
    extra = tmp_path / "more.json"
    extra.write_text(json.dumps(read(world["captions"]) + [{"image": "images/x.png", "image_id": "imgX", "caption": "x"}]))
    with pytest.raises(BlitextError, match=r"1 of 17 images .* \(first: 'imgX'\)"):
        eval_retrieval(common(world, runs, data=str(extra), out=str(tmp_path / "x")))
    r = runner.invoke(app, ["eval", "retrieval", "--features", str(world["features"])])
    assert r.exit_code == 2 and "needs --adapter" in r.output


def test_cli_caption_retrieval_and_compare(tmp_path, world, runs):  # noqa: F811
    app = typer.Typer()
    app.add_typer(eval_app, name="eval")
    app.command("compare")(compare_cmd)
    runner = CliRunner()
    base = ["--adapter", str(runs["s2"]), "--features", str(world["features"]), "--data", str(world["captions"]),
            "--limit", "4", "--device", "cpu"]
    r = runner.invoke(app, ["eval", "caption", *base, "--num-beams", "1", "--max-new-tokens", "3", "--min-new-tokens",
                            "1", "--tokenizer", "python", "--meteor", "off", "--spice", "off", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "CIDEr" in r.output and read(tmp_path / "c" / "metrics.json")["counts"] == {"images": 4}
    (tmp_path / "retrieval.json").write_text(json.dumps({"k": 2, "batch_size": 3}))  # a --config file
    r = runner.invoke(app, ["eval", "retrieval", *base, "--config", str(tmp_path / "retrieval.json")])
    assert r.exit_code == 0, r.output
    assert read(runs["s2"] / "eval" / "retrieval-captions_train" / "metrics.json")["counts"]["k"] == 2
    r = runner.invoke(app, ["compare", str(runs["s2"]), str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "txt_r1" in r.output and "CIDEr" in r.output
