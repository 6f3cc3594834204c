"""How far the pure-Python PTB tokenizer (blitext.metrics.ptb) is from pycocoevalcap's Java one.

Generates 400 varied captions (the test vector of docs/method.md#caption-metrics-test-vector plus templated sentences with commas,
quotes, hyphens, numbers, possessives, parentheses, "n't", abbreviations with periods; the Python
rules were tuned on these) and 300 held-out ones (random punctuation inserted into those, a seed
not looked at while tuning), tokenises them both ways as pycocoevalcap would (punctuation tokens
dropped) and counts the captions and tokens that differ; then scores a 100-image set built from
them, and that test vector, with each tokenizer and reports the score differences. Needs Java.

    python bench/tokenizer_diff.py
"""
from __future__ import annotations

import difflib
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import write_result  # noqa: E402

from blitext.metrics.caption import caption_scores, coco_tokenize  # noqa: E402

REFERENCE_VECTOR = {
    1: (["A man is riding a horse on the beach.", "A person rides a brown horse along the shore.",
         "A man on horseback at the ocean's edge."], "a man riding a horse on the beach"),
    2: (["Two dogs are playing with a red ball in the grass.", "Two puppies chase a ball on a lawn.",
         "A pair of dogs play in a grassy field."], "two dogs playing with a ball in the grass"),
    3: (["A plate of food with broccoli and rice.", "Rice and vegetables on a white plate.",
         "A dinner plate holds rice, broccoli and chicken."], "a plate of rice and broccoli"),
}
SUBJECTS = ["A man", "a woman", "Two dogs", "The cat's owner", "3 kids", "A 10-year-old boy", "Mr. Smith",
            "A U.S. soldier", "An old-fashioned car", "The dog's ball", "People (mostly tourists)",
            "A well-dressed man", "1,000 birds", "A man who isn't smiling", "Dr. Jones", "A St. Bernard",
            "The children's teacher", "A group of people", "Someone", "An elderly couple", "The team's mascot",
            "A black-and-white photo of a dog", "Several 18-wheelers", "The 2 girls", "A chef"]
VERBS = ["is riding", "rides", "can't reach", "doesn't like", "sits on", "stands next to", "is holding",
         "holds up", "looks at", "plays with", "won't eat", "is walking toward", "has", "carries",
         "is standing in front of", "points at", "didn't see", "leans against", "is cutting", "waits for"]
OBJECTS = ["a horse", "the beach", 'a "stop" sign', "the ocean's edge", "a plate of food (rice and broccoli)",
           "a red, white and blue flag", "a 2-story building", "the U.K. embassy", "a cup of coffee",
           "his mom's car", "a sign that reads 'no parking'", "a no. 5 bus", "a 3.5-inch screen",
           "a t-shirt", "an e-mail", "a hot-dog stand", "a $5 bill", "a 50% discount sign", "some fruit, etc.",
           "a clock showing 5:30", "a pizza (with extra cheese)", "the kids' toys", "a yellow/green kite",
           "a cake that says \"Happy Birthday!\"", "a man's hat", "a half-eaten sandwich", "a T.V. set"]
ENDINGS = [".", "", " on the beach.", " in the grass!", " at night?", "; it's raining.", " -- really.",
           ", near a hot-dog stand.", " in Washington, D.C.", " at 3 p.m.", " ...", " (see photo).",
           ", e.g. a lamp.", " at the St. Louis zoo.", " with his friend's dog.", " while it's snowing.",
           " and they're smiling.", " in the 1990s.", ", vs. a cat.", " at approx. 10 a.m."]


def generated_captions(n: int, seed: int = 0) -> list[str]:
    """Templated captions with the constructs where tokenizers disagree, plus odd spacing."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
        if rng.random() < 0.2:
            text = text.lower()
        if rng.random() < 0.1:
            text = "  " + text.replace(" ", "  ", 1) + " "
        out.append(text)
    return out


def perturbed_captions(captions: list[str], n: int, seed: int = 3) -> list[str]:
    """Captions with 1-3 random marks inserted anywhere, to find rules neither side was tuned for."""
    rng = random.Random(seed)
    marks = list(".,;:!?'\"()[]-/&$%#@*+=_`~") + ["--", "...", "'s", "n't", " .", "' "]
    out = []
    for _ in range(n):
        text = rng.choice(captions)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(text) + 1)
            text = text[:at] + rng.choice(marks) + text[at:]
        out.append(text)
    return out


def compare(captions: list[str]) -> dict:
    """Counts of differing captions and tokens between the two tokenizers."""
    keyed = {i: [c] for i, c in enumerate(captions)}
    java, python = coco_tokenize(keyed, "java"), coco_tokenize(keyed, "python")
    pairs = [(java[i][0].split(" "), python[i][0].split(" ")) for i in keyed]
    differing = [i for i, (j, p) in enumerate(pairs) if j != p]
    tokens = sum(len(j) for j, _ in pairs)
    wrong = sum(token_differences(j, p) for j, p in pairs)
    counts = {"captions": len(captions), "captions_identical": len(captions) - len(differing),
              "tokens_java": tokens, "tokens_differing": wrong, "token_difference_rate": wrong / tokens,
              "examples": [{"caption": captions[i], "java": java[i][0], "python": python[i][0]} for i in differing[:8]]}
    return counts


def token_differences(java: list[str], python: list[str]) -> int:
    """Tokens inserted, deleted or replaced to turn one tokenisation into the other."""
    ops = difflib.SequenceMatcher(a=java, b=python, autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")


def main() -> None:
    if not shutil.which("java"):
        sys.exit("needs Java: the Java PTBTokenizer is the reference")
    vector = [c for refs, hyp in REFERENCE_VECTOR.values() for c in [*refs, hyp]]
    captions = vector + generated_captions(400 - len(vector))
    templated = compare(captions)
    perturbed = compare(perturbed_captions(captions, 300))

    # Score effect: 100 images, 3 references and 1 hypothesis each, from the generated captions.
    rng = random.Random(1)
    pool = captions[len(vector):]
    refs = {i: rng.sample(pool, 3) for i in range(100)}
    hyps = {i: rng.choice(pool) for i in range(100)}
    by = {tok: caption_scores(refs, hyps, tokenizer=tok, meteor="off", spice="off").as_dict()
          for tok in ("java", "python")}
    metrics = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    vec_refs = {i: r for i, (r, _) in REFERENCE_VECTOR.items()}
    vec_hyps = {i: h for i, (_, h) in REFERENCE_VECTOR.items()}
    vec = {tok: caption_scores(vec_refs, vec_hyps, tokenizer=tok, meteor="off", spice="off").as_dict()
           for tok in ("java", "python")}
    write_result("tokenizer_diff", {
        "templated": templated, "perturbed": perturbed,
        "score_set_images": len(refs),
        "score_abs_difference": {m: abs(by["java"][m] - by["python"][m]) for m in metrics},
        "scores_java": {m: by["java"][m] for m in metrics},
        "reference_vector_abs_difference": {m: abs(vec["java"][m] - vec["python"][m]) for m in metrics},
    })


if __name__ == "__main__":
    main()
