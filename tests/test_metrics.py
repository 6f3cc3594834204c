"""blitext.metrics against the test vector of docs/method.md#caption-metrics-test-vector, pycocoevalcap itself, and hand-checked cases."""
from __future__ import annotations

import shutil

import pytest
import torch

import blitext.metrics.caption as caption_module
from blitext.errors import BlitextError
from blitext.metrics import (caption_scores, coco_tokenize, exact_match, normalize_answer, rerank_top_k,
                             retrieval_recall, teacher_forced_accuracy, vqa_accuracy, vqa_summary)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java (pycocoevalcap's jars)")

# docs/method.md#caption-metrics-test-vector: computed with pycocoevalcap 1.2 and Java 17.
VECTOR_REFS = {
    1: ["A man is riding a horse on the beach.", "A person rides a brown horse along the shore.",
        "A man on horseback at the ocean's edge."],
    2: ["Two dogs are playing with a red ball in the grass.", "Two puppies chase a ball on a lawn.",
        "A pair of dogs play in a grassy field."],
    3: ["A plate of food with broccoli and rice.", "Rice and vegetables on a white plate.",
        "A dinner plate holds rice, broccoli and chicken."],
}
VECTOR_HYPS = {1: "a man riding a horse on the beach", 2: "two dogs playing with a ball in the grass",
               3: "a plate of rice and broccoli"}
VECTOR_EXPECTED = {"bleu_1": 0.916717, "bleu_2": 0.819937, "bleu_3": 0.661930, "bleu_4": 0.524990,
                   "meteor": 0.429623, "rouge_l": 0.790811, "cider": 2.518906}
VECTOR_CIDER_PER_IMAGE = {1: 2.83436, 2: 2.30641, 3: 2.41595}
# The Python tokenizer gives the jar's tokens on this vector (bench/tokenizer_diff.py), so the
# scores are the same up to the vector's 6 printed digits.
PYTHON_TOLERANCE = 1e-6

# Small sets made up to exercise the tokenizer: clitics, quotes, brackets, numbers, abbreviations.
EXTRA_SETS = {
    "clitics": (
        {"a": ["The dog's ball isn't red; it's \"blue\".", "A dog won't drop its ball (a blue one)."],
         "b": ["Two kids can't reach the cookies' jar.", "Children who don't see the jar, sadly!"],
         "c": ["A man's hat -- black -- on a chair.", "A hat on the chair's back."]},
        {"a": "the dog's ball is blue", "b": "kids can't reach the jar", "c": "a black hat on a chair"}),
    "numbers": (
        {1: ["A 10-year-old boy holds 1,000 dollars.", "A boy with $5.99 at 3:30 p.m."],
         2: ["Mr. Smith stands in Washington, D.C. with a U.S. flag.", "A man near the U.S. Capitol, e.g. a tourist."],
         3: ["A 3.5-inch screen shows 50% battery.", "A phone's screen at 50 %."],
         4: ["A well-known St. Bernard dog.", "A big dog (a St. Bernard) in the snow..."]},
        {1: "a boy holding 1,000 dollars", 2: "a man with a u.s. flag in d.c.", 3: "a screen showing 50% battery",
         4: "a st. bernard dog in the snow"}),
    "empty": (
        {10: ["A red car parked on a street.", "A car on the road."],
         11: ["A cat sleeping on a sofa.", "A sleeping cat."],
         12: ["Birds flying over the sea.", "A flock of birds above water."]},
        {10: "a red car on a street", 11: "", 12: "..."}),
}


def pycocoevalcap_scores(refs: dict, hyps: dict) -> dict:
    """pycocoevalcap called by hand, as its COCOEvalCap.evaluate does (without METEOR and SPICE)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs[i]] for i in refs})
    res = tokenizer.tokenize({i: [{"caption": hyps[i]}] for i in refs})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, per_image = Cider().compute_score(gts, res)
    return {"bleu": bleu, "rouge_l": rouge, "cider": cider, "per_image": dict(zip(gts, per_image))}


def assert_vector(scores, tolerance: float, with_meteor: bool) -> None:
    for name, expected in VECTOR_EXPECTED.items():
        if name == "meteor" and not with_meteor:
            continue
        assert getattr(scores, name) == pytest.approx(expected, abs=tolerance), name
    for i, expected in VECTOR_CIDER_PER_IMAGE.items():  # printed with 5 decimals
        assert scores.cider_per_image[i] == pytest.approx(expected, abs=5e-6)


@needs_java
def test_caption_reference_vector_java():
    scores = caption_scores(VECTOR_REFS, VECTOR_HYPS, tokenizer="java", meteor="java", spice="off")
    assert scores.tokenizer == "java"
    assert_vector(scores, 1e-6, with_meteor=True)


def test_caption_reference_vector_python_tokenizer():
    scores = caption_scores(VECTOR_REFS, VECTOR_HYPS, tokenizer="python", meteor="off", spice="off")
    assert scores.tokenizer == "python" and scores.meteor is None and "METEOR" in scores.unavailable
    assert_vector(scores, PYTHON_TOLERANCE, with_meteor=False)


@needs_java
@pytest.mark.parametrize("name", sorted(EXTRA_SETS))
def test_caption_matches_pycocoevalcap(name):
    refs, hyps = EXTRA_SETS[name]
    ours = caption_scores(refs, hyps, tokenizer="java", meteor="off", spice="off")
    theirs = pycocoevalcap_scores(refs, hyps)
    got = [ours.bleu_1, ours.bleu_2, ours.bleu_3, ours.bleu_4]
    assert got == pytest.approx(theirs["bleu"], abs=1e-9)
    assert ours.rouge_l == pytest.approx(theirs["rouge_l"], abs=1e-9)
    assert ours.cider == pytest.approx(theirs["cider"], abs=1e-9)
    assert ours.cider_per_image == pytest.approx(theirs["per_image"], abs=1e-9)
    assert coco_tokenize(refs, "python") == coco_tokenize(refs, "java")


def test_single_image_cider_is_zero():
    scores = caption_scores({7: VECTOR_REFS[1]}, {7: VECTOR_HYPS[1]}, tokenizer="python", meteor="off", spice="off")
    assert scores.cider == 0.0 and scores.cider_per_image == {7: 0.0}
    assert scores.bleu_1 > 0.5  # the other metrics are not degenerate


def test_empty_hypothesis_scores_zero():
    refs, hyps = EXTRA_SETS["empty"]
    scores = caption_scores(refs, hyps, tokenizer="python", meteor="off", spice="off")
    assert scores.cider_per_image[11] == 0.0 and scores.cider_per_image[12] == 0.0
    assert 0 < scores.rouge_l < 1 and scores.cider_per_image[10] > 0


def test_bleu_of_an_order_no_caption_reaches_is_kept_but_said_to_measure_nothing():
    """3-word captions have no 4-gram: pycocoevalcap's BLEU-4 is then its smoothing constants
    (1e-15 / 1e-9)^(1/4) = 0.0316 even for exact captions; the number stays, marked undefined."""
    refs = {1: ["a red circle"], 2: ["a blue square"]}
    exact = caption_scores(refs, {1: "a red circle", 2: "a blue square"}, tokenizer="python", meteor="off", spice="off")
    assert exact.bleu_3 == pytest.approx(1.0) and exact.bleu_4 == pytest.approx(1e-6 ** 0.25, rel=1e-3)
    assert list(exact.undefined) == ["Bleu_4"] and "no reference caption has 4 words" in exact.undefined["Bleu_4"]
    assert "undefined" in exact.as_dict()
    longer = caption_scores(refs, {1: "a red circle on top", 2: "a blue square"}, tokenizer="python", meteor="off",
                            spice="off")
    assert longer.undefined == exact.undefined and longer.bleu_4 < 1e-3
    short = caption_scores({**refs, 2: ["a blue square on the left"]}, {1: "a red circle", 2: "a blue square"},
                           tokenizer="python", meteor="off", spice="off")
    assert list(short.undefined) == ["Bleu_4"] and "no generated caption has 4 words" in short.undefined["Bleu_4"]
    both = caption_scores({**refs, 2: ["a blue square on the left"]}, {1: "a red circle", 2: "a blue square on the left"},
                          tokenizer="python", meteor="off", spice="off")
    assert both.undefined == {} and both.bleu_4 > 0.5


def test_ids_missing_from_either_side_are_named():
    with pytest.raises(BlitextError, match="image 3 has references but no generated caption"):
        caption_scores(VECTOR_REFS, {1: "a", 2: "b"}, tokenizer="python", meteor="off")
    with pytest.raises(BlitextError, match="image 'extra' has a generated caption but no references"):
        caption_scores(VECTOR_REFS, {**VECTOR_HYPS, "extra": "x"}, tokenizer="python", meteor="off")
    with pytest.raises(BlitextError, match="must be one string"):
        caption_scores(VECTOR_REFS, {**VECTOR_HYPS, 1: ["a man"]}, tokenizer="python", meteor="off")


def test_without_java_meteor_is_reported_not_faked(monkeypatch):
    monkeypatch.setattr(caption_module.shutil, "which", lambda name: None)
    scores = caption_scores(VECTOR_REFS, VECTOR_HYPS)  # all "auto"
    assert scores.tokenizer == "python" and scores.meteor is None and scores.spice is None
    assert "java" in scores.unavailable["METEOR"]
    with pytest.raises(BlitextError, match="tokenizer='python'"):
        caption_scores(VECTOR_REFS, VECTOR_HYPS, tokenizer="java")
    with pytest.raises(BlitextError, match="METEOR cannot run"):
        caption_scores(VECTOR_REFS, VECTOR_HYPS, meteor="java")


def test_spice_unavailable_says_why():
    if not any(not (caption_module.SPICE_DIR / p).exists() for p in caption_module.SPICE_NEEDS):
        pytest.skip("SPICE's jars and models are installed here")
    scores = caption_scores(VECTOR_REFS, VECTOR_HYPS, tokenizer="python", meteor="off")
    assert scores.spice is None and "stanford-corenlp-3.6.0" in scores.unavailable["SPICE"]
    assert scores.as_dict()["SPICE"] is None and "CIDEr" in scores.as_dict()


# --- VQA ---

@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (5, 1.0)])
def test_vqa_check_values(k, expected):
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


@pytest.mark.parametrize("raw, normalised", [("Two.", "2"), ("the dog", "dog"), ("dont", "don't"),
                                             ("1,000", "1000"), ("yes!", "yes"), ("  A\tcat\n", "cat"),
                                             ("3.5", "3.5"), ("black-and-white", "black and white")])
def test_vqa_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_vqa_both_rule_normalises_both_sides():
    assert vqa_accuracy("Two.", ["2"] * 10, normalise="both") == 1.0
    assert vqa_accuracy("two", ["two"] * 10, normalise="both") == 1.0


def test_vqa_official_rule_is_the_default_and_leaves_ground_truth_unnormalised():
    # The prediction becomes "2"; unanimous answers are compared untouched, so "two" never matches.
    assert vqa_accuracy("two", ["two"] * 10) == vqa_accuracy("two", ["two"] * 10, normalise="official") == 0.0
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0  # the prediction is always normalised
    # When the humans disagree they get the punctuation step only: still no number words.
    assert vqa_accuracy("two", ["two"] * 9 + ["2"]) == pytest.approx(0.3)
    # and that step turns "yes!" into "yes " (trailing space), which no prediction equals.
    assert vqa_accuracy("yes", ["yes!"] * 9 + ["no"]) == 0.0
    assert vqa_accuracy("yes", ["yes!"] * 9 + ["no"], normalise="both") == 1.0
    with pytest.raises(BlitextError, match=r"--vqa-normalise.*'quirk' is unknown: use official .* or both"):
        vqa_accuracy("yes", ["yes"] * 10, normalise="quirk")


def test_vqa_summary_overall_and_per_answer_type():
    records = [{"prediction": "yes", "answers": ["yes"] * 10, "answer_type": "yes/no"},
               {"prediction": "no", "answers": ["yes"] * 10, "answer_type": "yes/no"},
               {"prediction": "3", "answers": ["three"] * 2 + ["four"] * 8, "answer_type": "number"}]
    summary = vqa_summary(records, normalise="both")  # "three" is "3" once normalised
    assert summary["overall"] == pytest.approx(100 * (1 + 0 + 0.6) / 3)
    assert summary["per_answer_type"] == pytest.approx({"yes/no": 50.0, "number": 60.0})
    assert summary["count"] == 3
    official = vqa_summary(records)  # the official rule keeps the human answers' "three": no match
    assert official["overall"] == pytest.approx(100 * 1 / 3)
    assert official["per_answer_type"] == pytest.approx({"yes/no": 50.0, "number": 0.0})


def test_gqa_exact_match():
    assert exact_match("The Dog.", "dog") == 1.0
    assert exact_match("cat", "dog") == 0.0
    assert exact_match("t-shirt", "t-shirt", normalise="both") == 1.0
    assert exact_match("t-shirt", "t-shirt") == 0.0  # official (LAVIS): "t shirt" != "t-shirt"
    with pytest.raises(BlitextError, match="exact_match"):
        vqa_accuracy("dog", ["dog"])


# --- retrieval ---

def test_retrieval_recall_by_hand():
    text_to_image = [0, 0, 1, 1, 2]
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.25, 0.3],
                        [0.5, 0.4, 0.3, 0.2, 0.6],
                        [0.1, 0.7, 0.2, 0.9, 0.4]])
    # image->text: image 0 ranks t0 first (rank 0); image 1 ranks t4 t0 t1 t2: its t2 at rank 3;
    #   image 2 ranks t3 t1 t4: its t4 at rank 2. Ranks [0, 3, 2].
    # text->image: t0 -> images 0,1,2: rank 0; t1 -> 2,1,0: rank 2; t2 -> 0,1: rank 1;
    #   t3 -> 2,0,1: rank 2; t4 -> 1,2: rank 1. Ranks [0, 2, 1, 2, 1].
    r = retrieval_recall(sim, text_to_image, ks=(1, 3, 5))
    assert r["txt_r1"] == pytest.approx(100 / 3) and r["txt_r3"] == pytest.approx(200 / 3) and r["txt_r5"] == 100
    assert r["img_r1"] == pytest.approx(20) and r["img_r3"] == 100 and r["img_r5"] == 100
    assert r["r_mean"] == pytest.approx(((100 / 3 + 200 / 3 + 100) / 3 + (20 + 100 + 100) / 3) / 2)


def test_retrieval_rejects_inconsistent_inputs():
    with pytest.raises(BlitextError, match="image 1 has no caption"):
        retrieval_recall(torch.zeros(2, 2), [0, 0])
    with pytest.raises(BlitextError, match="3 entries for 2 texts"):
        retrieval_recall(torch.zeros(2, 2), [0, 1, 1])


def test_rerank_changes_order_only_inside_top_k():
    g = torch.Generator().manual_seed(0)
    itc = torch.rand(6, 20, generator=g)
    calls = []

    def score_fn(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        calls.append(len(queries))
        return -candidates.float()  # prefers low candidate indices: an order ITC does not have

    out = rerank_top_k(itc, score_fn, k=5, queries_per_call=4)
    assert calls == [4, 2]
    for row in range(6):
        itc_order = itc[row].argsort(descending=True).tolist()
        new_order = out[row].argsort(descending=True).tolist()
        assert new_order[:5] == sorted(itc_order[:5])   # the same top 5, in score_fn's order
        assert new_order[5:] == itc_order[5:]           # everything else untouched
    truth = list(range(6)) + [0] * 14                    # stable: a model-agnostic end-to-end call
    assert set(retrieval_recall(out, truth, sim_t2i=out)) >= {"txt_r1", "img_r10", "r_mean"}


def test_teacher_forced_accuracy_counts_only_real_target_tokens():
    from blitext.losses import IGNORE_INDEX

    class FakeLLM:  # five positions: three real targets (two predicted), two ignored (one "predicted")
        def target_logits(self, prompts, batch):
            logits = torch.full((5, 4), -1.0)
            logits[torch.arange(5), torch.tensor([2, 1, 3, 0, 0])] = 1.0
            return logits, torch.tensor([2, 1, 0, IGNORE_INDEX, IGNORE_INDEX])

    assert teacher_forced_accuracy(FakeLLM(), torch.zeros(1, 1, 4), None) == pytest.approx(2 / 3)


def test_retrieval_refuses_nan_similarities():
    # Sorting puts NaN first: with 0.0 where the NaN is, R@1 is 66.7; the NaN made it 100.
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.1, float("nan"), 0.2], [0.0, 0.1, 0.9]])
    with pytest.raises(BlitextError, match="1 NaN .*model produced NaN similarities"):
        retrieval_recall(sim, [0, 1, 2])
    sim[0, 2] = sim[2, 0] = float("nan")
    with pytest.raises(BlitextError, match="3 NaN"):
        retrieval_recall(sim, [0, 1, 2])
    with pytest.raises(BlitextError, match="sim_t2i.* 1 NaN"):
        retrieval_recall(torch.eye(3), [0, 1, 2], sim_t2i=torch.eye(3).index_put_((torch.tensor(0),) * 2,
                                                                                   torch.tensor(float("nan"))))


def test_retrieval_recall_is_python_float_exact():
    # image 2 ranks text 0 first and its own text second: txt_r1 = 2/3.
    sim = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.5]])
    r = retrieval_recall(sim, [0, 1, 2], ks=(1,))
    assert r["txt_r1"] == 100 * 2 / 3 == 66.66666666666667


def test_vqa_bare_string_answers_are_one_answer_not_characters():
    # "two" was read as the answers ["t", "w", "o"] (score 0.0); one answer cannot be scored by the
    # leave-one-out rule (it would always be 0), so it is refused like ["two"].
    with pytest.raises(BlitextError, match="one answer 'two'.*exact_match"):
        vqa_accuracy("two", "two")
    with pytest.raises(BlitextError, match="VQA record 0.*one answer 'two'"):
        vqa_summary([{"prediction": "two", "answers": "two"}])
    assert vqa_accuracy("two", ("2",) * 10) == 1.0


def test_vqa_none_prediction_and_empty_ks_are_named():
    with pytest.raises(BlitextError, match="prediction must be a string, got None"):
        vqa_accuracy(None, ["cat"] * 10)
    with pytest.raises(BlitextError, match="VQA record 1: .*prediction must be a string, got None"):
        vqa_summary([{"prediction": "cat", "answers": ["cat"] * 10}, {"prediction": None, "answers": ["cat"] * 10}])
    with pytest.raises(BlitextError, match="prediction must be a string, got None"):
        exact_match(None, "dog")
    with pytest.raises(BlitextError, match="answers of the question must be strings, got None"):
        vqa_accuracy("cat", ["cat"] * 9 + [None])
    with pytest.raises(BlitextError, match=r"ks must name at least one k .*got \(\)"):
        retrieval_recall(torch.eye(2), [0, 1], ks=())
    with pytest.raises(BlitextError, match=r"ks must .*got \(0, 5\)"):
        retrieval_recall(torch.eye(2), [0, 1], ks=(0, 5))
