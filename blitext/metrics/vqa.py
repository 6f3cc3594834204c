"""VQA accuracy as the official VQAv2 / OK-VQA evaluation script computes it (the copy in LAVIS,
lavis/common/vqa_tools/vqa_eval.py, which BLIP-2 and P-Former report with), and GQA exact match.

Normalisation of an answer: newlines and tabs to spaces, strip; the punctuation rule; lower
case; number words to digits; articles dropped; the contractions map. One question's accuracy:
for each of the n human answers, min(1, matches among the other n-1 / 3), averaged.

Two rules for the ground truth (`normalise`), the prediction always getting every step:
- "official" (the default, so numbers compare with papers): the ground truth as the official
  script treats it. A human answer gets the punctuation step alone, and only when the humans
  disagree; unanimous answers are compared untouched, so "two" against ten "two" scores 0.
  GQA's answer is compared untouched (LAVIS's GQA code).
- "both": the ground truth gets every step too, as the prediction does.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Mapping

from blitext.errors import BlitextError

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # the official map as it is, oddities included ("somebody'd" -> "somebodyd"; capitalised keys never match)
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a lookahead, so every period not before a digit goes
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
PERIOD_STRIP_COUNT = re.UNICODE  # sic: the script passes re.UNICODE (32) as sub()'s count
NORMALISATIONS = ("official", "both")  # the ground-truth rules (module docstring)
DEFAULT_NORMALISATION = "official"  # the one place the default rule is written


def check_normalisation(normalise: str) -> str:
    """The rule, or a named error for anything else (checked before a long run starts)."""
    if normalise not in NORMALISATIONS:
        raise BlitextError(f"answer normalisation (--vqa-normalise) {normalise!r} is unknown: use official (the "
                           f"official VQA script's ground truth, numbers as in papers) or both (ground truth "
                           f"normalised as the prediction is)")
    return normalise


def process_punctuation(text: str) -> str:
    """The official punctuation step: a mark next to a space, or any mark when the text holds a
    number like 1,000, is deleted; otherwise it becomes a space. Periods not before a digit go."""
    out = text
    has_thousands = COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        if p + " " in text or " " + p in text or has_thousands:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official word step: lower case, number words to digits, articles out, contractions in."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """A prediction as the official script compares it (all steps)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str] | str, normalise: str = DEFAULT_NORMALISATION) -> float:
    """Accuracy of one question, 0..1: mean over the human answers of min(1, matches among the others / 3).

    A bare string is one answer (not its characters); one answer is refused like ["two"], since
    the leave-one-out rule would always score it 0. normalise="official" compares against the
    answers as the official script does (untouched when all humans agree, else after the
    punctuation step only); "both" normalises them fully."""
    check_normalisation(normalise)
    _require_text(prediction, "the prediction")
    answers = _answer_list(answers)
    if len(answers) < 2:
        got = f"one answer {answers[0]!r}" if answers else "no answers"
        raise BlitextError(f"vqa_accuracy needs the human answers of a question (10 in VQAv2 and OK-VQA), got "
                           f"{got}: for one-answer datasets such as GQA use exact_match")
    predicted = normalize_answer(prediction)
    if normalise == "both":
        truth = [normalize_answer(a) for a in answers]
    elif len(set(answers)) > 1:
        truth = [process_punctuation(a) for a in answers]
    else:
        truth = list(answers)
    matches = [t == predicted for t in truth]
    total = sum(matches)
    per_human = [min(1.0, (total - m) / 3) for m in matches]  # the other n-1 humans of each one
    return sum(per_human) / len(per_human)


def _require_text(value, what: str) -> None:
    """Normalisation needs strings: a None (a failed generation, a missing field) is named, not an AttributeError."""
    if not isinstance(value, str):
        raise BlitextError(f"{what} must be a string, got {value!r}: pass the model's answer text "
                           f"(an empty string for no answer)")


def _answer_list(answers) -> list[str]:
    """The human answers as a list of strings; a bare string is one answer, not its characters."""
    if isinstance(answers, str):
        return [answers]
    if not isinstance(answers, (list, tuple)):
        raise BlitextError(f"answers must be a list of the human answers (strings), got {answers!r}")
    bad = [a for a in answers if not isinstance(a, str)]
    if bad:
        raise BlitextError(f"the answers of the question must be strings, got {bad[0]!r} in {answers!r}: "
                           f"drop or fix that answer")
    return list(answers)


def exact_match(prediction: str, answer: str, normalise: str = DEFAULT_NORMALISATION) -> float:
    """GQA accuracy of one question: 1.0 when the normalised prediction equals the answer.

    The official (LAVIS) GQA code normalises only the prediction ("official"); "both" normalises the answer too."""
    check_normalisation(normalise)
    _require_text(prediction, "the prediction")
    _require_text(answer, "the answer")
    truth = normalize_answer(answer) if normalise == "both" else answer
    return float(normalize_answer(prediction) == truth)


def vqa_summary(records: Iterable[Mapping], normalise: str = DEFAULT_NORMALISATION) -> dict:
    """Overall and per-answer-type accuracy x100, as the official script reports (unrounded).

    records: {"prediction": str, "answers": [str, ...], "answer_type": str (optional)}."""
    check_normalisation(normalise)
    overall: list[float] = []
    by_type: dict[str, list[float]] = defaultdict(list)
    for n, r in enumerate(records):
        if "prediction" not in r or "answers" not in r:
            raise BlitextError(f"VQA record {n} has keys {sorted(r)}: each needs 'prediction' and 'answers'")
        try:
            acc = vqa_accuracy(r["prediction"], r["answers"], normalise)
        except BlitextError as e:
            raise BlitextError(f"VQA record {n}: {e}") from None
        overall.append(acc)
        if r.get("answer_type") is not None:
            by_type[r["answer_type"]].append(acc)
    if not overall:
        raise BlitextError("vqa_summary got no records: pass one record per question")
    return {"overall": 100 * sum(overall) / len(overall), "count": len(overall),
            "per_answer_type": {t: 100 * sum(v) / len(v) for t, v in by_type.items()}}
