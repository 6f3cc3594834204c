"""COCO caption metrics with pycocoevalcap 1.2's semantics: the numbers BLIP-2 and P-Former report.

What is computed (docs/method.md#caption-metrics): captions are lower-cased and tokenised by Stanford's
PTBTokenizer, punctuation tokens are dropped, then pycocoevalcap's own scorers run:
BLEU-1..4 (corpus level, "closest" reference length), METEOR 1.5 (Java), ROUGE-L (LCS F-measure,
beta 1.2), CIDEr-D (idf from the references of the evaluated set, so a single image always
gets 0) and SPICE (Java plus Stanford CoreNLP models that pycocoevalcap downloads on first use).

Tokenisation: "java" runs the jar pycocoevalcap ships, with pycocoevalcap's flags
(-preserveLines -lowerCase) and its punctuation list; "python" runs blitext.metrics.ptb, a
re-implementation for machines without Java. bench/tokenizer_diff.py measures how far apart
they are (bench/results/tokenizer_diff.json, 2026-11-28): identical output on 400 of 400
templated captions (4824 tokens; the rules were tuned on these) and on 300 of 300 held-out
captions with random punctuation inserted (4140 tokens), so 0 difference in BLEU, ROUGE-L and
CIDEr on a 100-image set and on docs/method.md#caption-metrics-test-vector. Known gaps: rare slash/hyphen mixes
("1/2-3" is one token here, two in the jar) and non-ASCII spacing or letters where Python's
Unicode classes differ from Java's.

Two deliberate differences from calling pycocoevalcap by hand: every line break inside a
caption becomes a space (pycocoevalcap only replaces "\\n", so a "\\r" shifts every later
caption onto the wrong image), and the jar is told the text is UTF-8 (it would otherwise use
the platform charset).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Hashable

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer import ptbtokenizer

from blitext.errors import BlitextError
from blitext.metrics.ptb import ptb_tokenize

PUNCTUATIONS = set(ptbtokenizer.PUNCTUATIONS)     # tokens pycocoevalcap drops after the PTB tokenizer
PTB_JAR = Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
SPICE_DIR = Path(ptbtokenizer.__file__).parent.parent / "spice"
SPICE_NEEDS = ["spice-1.0.jar", "lib/stanford-corenlp-3.6.0.jar", "lib/stanford-corenlp-3.6.0-models.jar"]
LINE_BREAKS = re.compile("[\r\n\u2028\u2029\x0b\x0c\x85]")   # what the jar treats as a new line


@dataclass
class CaptionScores:
    """pycocoevalcap's numbers for one evaluated set, on its scale (BLEU 0..1, CIDEr about 0..10;
    papers print them x100)."""
    bleu_1: float
    bleu_2: float
    bleu_3: float
    bleu_4: float
    meteor: float | None                # None when not run; the reason is in `unavailable`
    rouge_l: float                      # mean over images
    cider: float                        # CIDEr-D, mean over images
    spice: float | None                 # None when not run; the reason is in `unavailable`
    cider_per_image: dict[Hashable, float]
    tokenizer: str                      # "java" or "python": which tokenizer produced the tokens
    unavailable: dict[str, str] = field(default_factory=dict)  # metric name -> why it is None
    undefined: dict[str, str] = field(default_factory=dict)  # metric name -> why its number measures nothing here

    def as_dict(self) -> dict:
        """The scores under pycocoevalcap's names (Bleu_4, METEOR, ROUGE_L, CIDEr, SPICE)."""
        d = asdict(self)
        names = {"bleu_1": "Bleu_1", "bleu_2": "Bleu_2", "bleu_3": "Bleu_3", "bleu_4": "Bleu_4",
                 "meteor": "METEOR", "rouge_l": "ROUGE_L", "cider": "CIDEr", "spice": "SPICE"}
        return {names.get(k, k): v for k, v in d.items()}


def caption_scores(refs: dict[Hashable, list[str]], hyps: dict[Hashable, str], tokenizer: str = "auto",
                   meteor: str = "auto", spice: str = "auto") -> CaptionScores:
    """Score one generated caption per image against that image's reference captions.

    tokenizer: "auto" (the Java PTBTokenizer when `java` is on PATH, else the Python one),
    "java" or "python". meteor and spice: "auto" (run when they can run, else None with the
    reason), "java" (run or raise) or "off". An empty hypothesis scores 0, as in pycocoevalcap.
    """
    _check_pairs(refs, hyps)
    ids = list(refs)
    used = _choose_tokenizer(tokenizer)
    gts = coco_tokenize(refs, used)                       # two runs, as pycocoevalcap: a caption's tokens
    res = coco_tokenize({i: [hyps[i]] for i in ids}, used)  # can depend on the next line in the file

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, per_image = Cider().compute_score(gts, res)
    unavailable: dict[str, str] = {}
    meteor_score = _optional_metric("METEOR", meteor, _meteor, gts, res, unavailable)
    spice_score = _optional_metric("SPICE", spice, _spice, gts, res, unavailable)
    return CaptionScores(*(float(b) for b in bleu), meteor=meteor_score, rouge_l=float(rouge), cider=float(cider),
                         spice=spice_score, cider_per_image={i: float(s) for i, s in zip(ids, per_image)},
                         tokenizer=used, unavailable=unavailable, undefined=bleu_without_ngrams(gts, res))


def bleu_without_ngrams(gts: dict[Hashable, list[str]], res: dict[Hashable, list[str]]) -> dict[str, str]:
    """The BLEU-n whose number measures nothing on these tokenised captions, with why.

    pycocoevalcap multiplies each order's precision (correct + 1e-15) / (guessed + 1e-9): where no
    reference has n words no n-gram can be right, whatever the captions; where no generated caption
    has n words there is no n-gram to count. Either way BLEU-n is set by those constants (1e-6^(1/n)
    times the lower orders, 0.0316 for BLEU-4 over exact 3-word captions such as "a red circle", or
    about 0), not by the captions. The value is kept, as pycocoevalcap reports it, and said to be
    void; the references' reason first, as it holds for any captions scored against them."""
    longest_ref = max((len(c.split()) for caps in gts.values() for c in caps), default=0)
    longest_hyp = max((len(c.split()) for caps in res.values() for c in caps), default=0)
    out = {}
    for n in range(1, 5):
        if longest_ref < n or longest_hyp < n:
            whose = "reference" if longest_ref < n else "generated"
            out[f"Bleu_{n}"] = (f"no {whose} caption has {n} words, so no {n}-gram can match: the value comes from "
                                f"pycocoevalcap's smoothing constants, not from the captions")
    return out


def _check_pairs(refs: dict, hyps: dict) -> None:
    """Fail on what pycocoevalcap would only assert on (or silently misalign)."""
    if not refs:
        raise BlitextError("no reference captions given: pass refs as {image_id: [caption, ...]}")
    missing_hyp = [i for i in refs if i not in hyps]
    if missing_hyp:
        raise BlitextError(f"image {missing_hyp[0]!r} has references but no generated caption "
                           f"({len(missing_hyp)} such images): generate captions for every image in refs")
    missing_ref = [i for i in hyps if i not in refs]
    if missing_ref:
        raise BlitextError(f"image {missing_ref[0]!r} has a generated caption but no references "
                           f"({len(missing_ref)} such images): evaluate against the annotations that contain it")
    for i in refs:
        if isinstance(refs[i], str) or not refs[i] or not all(isinstance(r, str) for r in refs[i]):
            raise BlitextError(f"references of image {i!r} must be a non-empty list of strings, got {refs[i]!r}")
        if not isinstance(hyps[i], str):
            raise BlitextError(f"the generated caption of image {i!r} must be one string, got {hyps[i]!r}")


def coco_tokenize(captions: dict[Hashable, list[str]], tokenizer: str = "auto") -> dict[Hashable, list[str]]:
    """Captions as pycocoevalcap scores them: PTB tokens, lower case, punctuation tokens dropped,
    joined by single spaces. tokenizer: "java" or "python" ("auto" picks as caption_scores does).

    All captions go through the tokenizer as one file, in dict order, like pycocoevalcap's
    PTBTokenizer.tokenize: the jar looks past a line's end, so the grouping matters."""
    used = _choose_tokenizer(tokenizer)
    keys = [k for k, texts in captions.items() for _ in texts]
    lines = [LINE_BREAKS.sub(" ", t) for texts in captions.values() for t in texts]
    tokenised = _java_tokenize(lines) if used == "java" else ptb_tokenize(lines)
    out: dict[Hashable, list[str]] = {k: [] for k in captions}
    for k, tokens in zip(keys, tokenised):
        out[k].append(" ".join(t for t in tokens if t not in PUNCTUATIONS))
    return out


def _choose_tokenizer(choice: str) -> str:
    """Resolve "auto" and refuse "java" without Java, rather than falling back silently."""
    if choice not in ("auto", "java", "python"):
        raise BlitextError(f"tokenizer {choice!r} is not one of 'auto', 'java', 'python'")
    if choice == "auto":
        return "java" if shutil.which("java") else "python"
    if choice == "java" and not shutil.which("java"):
        raise BlitextError("tokenizer='java' needs Java, and `java` is not on PATH: install a JRE "
                           "or pass tokenizer='python'")
    return choice


def _java_tokenize(lines: list[str]) -> list[list[str]]:
    """Run pycocoevalcap's PTBTokenizer jar on a file of these lines, written as pycocoevalcap
    writes it (no newline after the last: the jar reads the end of the file as context)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_text("\n".join(lines), encoding="utf-8")
        cmd = ["java", "-cp", str(PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", "-encoding", "utf-8", str(path)]
        done = subprocess.run(cmd, capture_output=True)
    out = done.stdout.decode("utf-8").split("\n")
    if len(out) == len(lines) + 1 and out[-1] == "":
        out.pop()
    if done.returncode != 0 or len(out) != len(lines):
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
        raise BlitextError(f"the Java PTBTokenizer failed (exit {done.returncode}, {len(out)} lines "
                           f"for {len(lines)} captions: {tail}): check `java -version` or pass tokenizer='python'")
    return [line.rstrip().split(" ") for line in out]  # as pycocoevalcap splits: a "3\u00a01/2" stays one token


def _optional_metric(name: str, choice: str, run: Callable[[dict, dict], float], gts: dict, res: dict,
                     unavailable: dict[str, str]) -> float | None:
    """METEOR and SPICE need Java (and SPICE extra downloads): run them, or say why not."""
    if choice not in ("auto", "java", "off"):
        raise BlitextError(f"{name.lower()}={choice!r} is not one of 'auto', 'java', 'off'")
    reason = "turned off" if choice == "off" else _missing_for(name)
    if reason is None:
        return run(gts, res)
    if choice == "java":
        raise BlitextError(f"{name} cannot run: {reason}; pass {name.lower()}='auto' or 'off' to go on without it")
    unavailable[name] = reason
    return None


def _missing_for(name: str) -> str | None:
    """What is missing for METEOR or SPICE to run here, or None."""
    if not shutil.which("java"):
        return "needs Java and `java` is not on PATH"
    if name == "SPICE":
        absent = [p for p in SPICE_NEEDS if not (SPICE_DIR / p).exists()]
        if absent:
            return (f"needs {', '.join(absent)} under {SPICE_DIR} (pycocoevalcap downloads the Stanford "
                    f"CoreNLP 3.6.0 jars on first use: run "
                    f"`python -m pycocoevalcap.spice.get_stanford_models` once with network access)")
    return None


def _meteor(gts: dict, res: dict) -> float:
    """pycocoevalcap's METEOR 1.5 wrapper; its Java process is always shut down afterwards."""
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    except (ValueError, OSError) as e:  # the jar died: an empty line instead of a score, or a broken pipe
        raise BlitextError(f"METEOR (java -jar meteor-1.5.jar) returned no score ({e}): it needs about 2 GB of "
                           f"memory; free some or pass meteor='off'") from None
    finally:
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
        scorer.lock = threading.Lock()  # an exception left its lock held, and its __del__ would wait forever
    return float(score)


def _spice(gts: dict, res: dict) -> float:
    """pycocoevalcap's SPICE (only reached when its jars and models are installed)."""
    try:
        score, _ = Spice().compute_score(gts, res)
    except subprocess.CalledProcessError as e:
        raise BlitextError(f"SPICE (java -jar spice-1.0.jar) failed with exit {e.returncode}: "
                           f"pass spice='off' to go on without it") from None
    return float(score)


def caption_exact_match(refs: dict[Hashable, list[str]], hyps: dict[Hashable, str]) -> float:
    """Share of images whose caption equals one of its references once both are lower-cased, their
    punctuation dropped and their spaces collapsed: for short templated captions ("a red circle"),
    where n-gram metrics hide whether the whole caption is right."""
    hits = caption_exact_hits(refs, hyps)
    return sum(hits.values()) / len(hits)


def caption_exact_hits(refs: dict[Hashable, list[str]], hyps: dict[Hashable, str]) -> dict[Hashable, bool]:
    """Per image: does its caption equal one of its references (as caption_exact_match compares)?"""
    _check_pairs(refs, hyps)
    return {k: _plain(hyps[k]) in {_plain(r) for r in refs[k]} for k in hyps}


def _plain(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())
