"""How high the text ceiling of `eval vqa` goes under a few prompt formats and decodings.

    BLITEXT_CACHE=/tmp/democache python bench/vqa_ceiling.py [--data FOLDER] [--questions 120]

The text ceiling is what the frozen LLM (SmolLM2-135M-Instruct, the demos' LLM) answers when the
image's human caption is given as text where the adaptor's soft prompts go. Each variant here
is a context (the caption, in the prompts' slot), a text prompt with the question and decoding
settings; generation is eval vqa's own (blitext.evaluation.decoding.generate_from_text, stop at "\\n") and
scoring is eval vqa's own with --vqa-normalise both (the rule its recorded results used; easy-VQA's
answers are words that normalisation leaves as they are, so the official rule scores the same), on
the first N test questions of an easy-VQA folder made by `blitext data prepare easy-vqa`
(captions_test.json beside vqa_test_questions.json). A variant is "caption first" when the caption opens the LLM's input,
as the soft prompts do in eval vqa; only such a format can be used by the adaptor as it is.
Writes bench/results/vqa_ceiling.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

from blitext.config import default_cache_root  # noqa: E402
from blitext.data.readers import read_image_set  # noqa: E402
from blitext.data.vqa import read_vqa  # noqa: E402
from blitext.evaluation.score import majority_answers, vqa_metrics  # noqa: E402  (eval vqa's own scoring)
from blitext.evaluation.decoding import VQA_PROMPT, GenerationSettings, generate_from_text  # noqa: E402
from blitext.models.loading import load_llm  # noqa: E402

SMOLLM_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CHAT_CONTEXT = SMOLLM_SYSTEM + "<|im_start|>user\n{caption}\n"
CHAT_PROMPT = "Question: {}\nAnswer with one or two words.<|im_end|>\n<|im_start|>assistant\n"
BEAM = dict(num_beams=5, length_penalty=-1.0)  # eval vqa's defaults (docs/method.md#generation-settings), 1..10 new tokens
GREEDY = dict(num_beams=1)
VARIANTS = {  # name: (context with {caption}, text prompt with {} for the question, decoding)
    "paper, beam 5 (eval vqa's default)": ("{caption}\n", VQA_PROMPT, BEAM),
    "paper, greedy": ("{caption}\n", VQA_PROMPT, GREEDY),
    "Question: {} Answer:, beam 5": ("{caption}\n", "Question: {} Answer:", BEAM),
    "Question: {} Answer:, greedy": ("{caption}\n", "Question: {} Answer:", GREEDY),
    "Image: {caption}. + paper, beam 5": ("Image: {caption}.\n", VQA_PROMPT, BEAM),
    "SmolLM2 chat template, beam 5": (CHAT_CONTEXT, CHAT_PROMPT, BEAM),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_cache_root() / "data" / "easy-vqa-500" / "easy-vqa")
    parser.add_argument("--questions", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    records = read_vqa(args.data / "vqa_test_questions.json", args.data / "vqa_test_annotations.json")
    records = records[:args.questions]
    caption_set = read_image_set(args.data / "captions_test.json")
    captions = {r.id: next(c for c in r.captions if c.strip()) for r in caption_set.records}
    llm = load_llm("smollm2-135m")
    check_chat_template(llm)
    base = vqa_metrics(records, majority_answers(records), "both")
    results = {}
    for name, (context, prompt, decoding) in VARIANTS.items():
        settings = GenerationSettings.for_task("vqa", prompt=prompt, **decoding)
        started = time.perf_counter()
        contexts = [context.format(caption=captions[r.image_id]) for r in records]
        texts = [prompt.format(r.question) for r in records]
        answers = [a for s in range(0, len(records), args.batch_size)
                   for a in generate_from_text(llm, contexts[s:s + args.batch_size], texts[s:s + args.batch_size],
                                               settings, "\n")]
        results[name] = {"context": context, "prompt": prompt, "settings": vars(settings),
                         "caption_first": context.startswith("{caption}"),
                         "metrics": vqa_metrics(records, answers, "both"),
                         "blank_answers": sum(not a.strip() for a in answers),
                         "examples": [[r.question, captions[r.image_id], r.answers[0], a]
                                      for r, a in list(zip(records, answers))[:6]],
                         "seconds": round(time.perf_counter() - started, 1)}
        print(f"{name}: {results[name]['metrics']} blank {results[name]['blank_answers']}", flush=True)
    write_result("vqa_ceiling", {"data": str(args.data), "questions": len(records), "llm": llm.fingerprint,
                                 "majority_answer_base_rate": base, "variants": results})
    print(table(results, base))


def check_chat_template(llm) -> None:
    """The chat variant's strings are SmolLM2's own template (with its default system turn)."""
    message = {"role": "user", "content": "CAPTION\nQuestion: Q\nAnswer with one or two words."}
    rendered = llm.tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)
    assert rendered == CHAT_CONTEXT.format(caption="CAPTION") + CHAT_PROMPT.format("Q"), rendered


def table(results: dict, base: dict) -> str:
    rows = ["| format | caption first | overall | yes/no | other | blank answers |", "|---|---|---|---|---|---|"]
    rows.append(f"| majority answer (base rate) | - | {base['accuracy']:.1f} | "
                f"{base['per_answer_type'].get('yes/no', 0):.1f} | {base['per_answer_type'].get('other', 0):.1f} | - |")
    for name, r in results.items():
        m = r["metrics"]
        rows.append(f"| {name} | {'yes' if r['caption_first'] else 'no'} | {m['accuracy']:.1f} | "
                    f"{m['per_answer_type'].get('yes/no', 0):.1f} | {m['per_answer_type'].get('other', 0):.1f} | "
                    f"{r['blank_answers']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
