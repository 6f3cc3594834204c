"""After stage 2: `blitext eval caption|vqa|retrieval` and `blitext compare`, from a feature cache.

Every evaluation reads the visual tokens of the images it scores from a feature cache made
by the encoder the adaptor was trained on (extract-features on the evaluation data), never
images, and writes `<out>/metrics.json` (scores, settings, counts, provenance, the adaptor's
fingerprint) and `<out>/predictions.json` in the official results format. The settings
are docs/method.md#generation-settings, the metrics' semantics docs/method.md#metrics:

- caption: one caption per image with the caption settings ("a photo of", beam 5, 8..30
  new tokens), scored by pycocoevalcap's BLEU / METEOR / ROUGE-L / CIDEr / SPICE.
- vqa: zero-shot answers ("Question: {} Short answer:", beam 5, 1..10 tokens, length
  penalty -1); VQAv2 / OK-VQA accuracy overall and per answer type, GQA exact match (the
  ground truth as the official script treats it, or --vqa-normalise both). Beside
  it, the text ceiling: the same LLM, prompt and decoding given each image's human caption as
  text instead of the soft prompts (what the adaptor could reach if its prompts carried the
  caption perfectly), and the majority-answer base rate it must clear to mean anything.
- retrieval: ITC similarity of every image-text pair, then each query's top k=128 re-scored
  with ITM + ITC and ranked by that, as LAVIS's BLIP-2 `compute_sim_matrix`: the ITM score is
  the positive-class logit averaged over the query outputs (not a softmax), the ITC term the
  raw cosine (no temperature; blitext.evaluation.retrieval). Needs the stage-1 heads, which
  every adaptor checkpoint holds.

The metric steps (references, metrics, ids) are blitext.evaluation.score's, which `blitext score`
runs on any system's predictions: scoring eval's predictions.json gives its metrics.
`compare_runs` puts the numbers of several metrics.json files side by side.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from blitext.models.adapter_checkpoint import LoadedAdapter, load_adapter, load_llm_for_generation
from blitext.atomic import check_out, read_json, write_json, writing
from blitext.evaluation.compare import CEILING, beside_scores, print_metrics, say_unscored
from blitext.cache import FeatureCache
from blitext.config import provenance, to_jsonable
from blitext.console import progress_bar, say
from blitext.data.readers import read_image_set
from blitext.data.text import caption_key
from blitext.distributed import use_device
from blitext.errors import BlitextError
from blitext.evaluation.decoding import (GenerationSettings, generate_from_text, generate_texts, require_settings,
                                         trained_settings)
from blitext.evaluation.retrieval import RetrievalScorer
from blitext.evaluation.score import (ScoreConfig, caption_metrics, caption_references, coco_id, majority_answers,
                                      vqa_metrics, vqa_records)
from blitext.metrics import retrieval_recall
from blitext.metrics.vqa import check_normalisation

CEILING_SEPARATOR = "\n"  # after the caption, before the VQA prompt: the caption is a line of its own
CEILING_MARGIN = 10.0     # points above the base rate below which the ceiling says the LLM cannot answer


@dataclass
class EvalConfig:
    adapter: str = ""                  # train-adapter run folder, <run>/final or a checkpoint (vqa/caption: stage 2)
    features: str = ""                 # feature cache of the evaluation images (extract-features on the eval data)
    data: str = ""                     # caption/retrieval: caption JSON (or folder); vqa: VQAv2 questions or GQA JSON
    annotations: str | None = None     # vqa: VQAv2 / OK-VQA annotations JSON (answers); none = predictions only
    out: str | None = None             # default <run>/eval/<task>-<data name>
    limit: int | None = None           # only the first N images (caption, retrieval) or questions (vqa)
    batch_size: int = 16               # images (or questions) per LLM generate call
    device: str = "auto"
    llm: str | None = None             # default: the LLM the adaptor was trained for
    prompt: str | None = None          # generation overrides; None = docs/method.md#generation-settings
    settings: str = "run"              # captions: run (the adaptor's training prompt and caption length) | paper
    num_beams: int | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    length_penalty: float | None = None
    blank_start: bool | None = None     # may the first new token be whitespace alone (None: captions yes, answers no)
    tokenizer: str = ScoreConfig.tokenizer   # caption: PTB tokenizer, auto | java | python (score's defaults)
    meteor: str = ScoreConfig.meteor         # caption: auto (run when Java is there) | java (run or fail) | off
    spice: str = ScoreConfig.spice           # caption: as meteor; SPICE also needs Stanford models downloaded
    vqa_normalise: str = ScoreConfig.vqa_normalise  # vqa: official (the script's ground truth) | both (both sides)
    captions: str | None = None        # vqa: the images' captions (text ceiling); default captions_<split>.json beside data
    k: int = 128                       # retrieval: candidates per query re-scored with ITM (BLIP-2: 128)
    skip_missing: bool = False         # score only the images the cache holds (the rest counted), not refuse


@dataclass
class Evaluation:
    """What every task opens: the adaptor, its feature cache, where results go."""
    config: EvalConfig
    task: str
    adapter: LoadedAdapter
    cache: FeatureCache
    out: Path
    device: str
    skipped: int = 0   # images of the data with no features, left out by --skip-missing


# ---------------------------------------------------------------- the three tasks

def eval_caption(config: EvalConfig) -> dict:
    """Caption every image of `data` that the cache holds; COCO caption metrics against its captions."""
    ev = _open(config, "caption")
    llm = load_llm_for_generation(ev.adapter, ev.config.llm, ev.device)
    refs = caption_references(config.data, config.limit)
    ids = _with_features(ev, list(refs))
    refs = {i: refs[i] for i in ids}
    settings = _settings(config, "caption", ev.adapter)
    hyps = _generate(ev, llm, settings, ids, [settings.prompt] * len(ids), "image")
    metrics, extra = caption_metrics(refs, dict(zip(ids, hyps)), config.tokenizer, config.meteor, config.spice)
    _write(ev, "predictions.json", [{"image_id": coco_id(i), "caption": h} for i, h in zip(ids, hyps)])
    return _finish(ev, metrics, {"images": len(ids)}, settings, **extra)


def eval_vqa(config: EvalConfig) -> dict:
    """Zero-shot answers to every question; VQAv2 accuracy (10 human answers) or GQA exact match (one)."""
    normalise = check_normalisation(config.vqa_normalise)  # before loading or generating anything
    ev = _open(config, "vqa")
    llm = load_llm_for_generation(ev.adapter, ev.config.llm, ev.device)
    records = vqa_records(config.data, config.annotations, config.limit)
    kept = set(_with_features(ev, [r.image_id for r in records]))
    records = [r for r in records if r.image_id in kept]
    settings = _settings(config, "vqa", ev.adapter)
    if "{}" not in settings.prompt:
        raise BlitextError(f"--prompt {settings.prompt!r} has no {{}} for the question: e.g. 'Question: {{}} Answer:'")
    captions = question_captions(config, records)  # before generating: a wrong --captions fails at once
    texts = [settings.prompt.format(r.question) for r in records]
    answers = _generate(ev, llm, settings, [r.image_id for r in records], texts, "question")
    _write_answers(ev, "predictions.json", records, answers)
    metrics = vqa_metrics(records, answers, normalise)
    return _finish(ev, metrics, {"questions": len(records)}, settings, answer_normalisation=normalise,
                   **_ceiling_and_base_rate(ev, llm, settings, records, texts, captions))


def eval_retrieval(config: EvalConfig) -> dict:
    """Image->text and text->image R@1/5/10 over the images of `data` and all their captions."""
    ev = _open(config, "retrieval")
    if ev.adapter.tokenizer is None:
        raise BlitextError(f"{ev.adapter.path} is a video adaptor: retrieval needs the Q-Former's ITC and ITM heads, "
                           f"which it has not; evaluate it with eval caption")
    records = [r for r in read_image_set(config.data).records if any(c.strip() for c in r.captions)]
    records = records[:config.limit] if config.limit else records
    kept = set(_with_features(ev, [r.id for r in records]))
    records = [r for r in records if r.id in kept]
    image_ids = [r.id for r in records]
    text_ids, texts, text_to_image = [], [], []
    for i, r in enumerate(records):
        for n, caption in enumerate(r.captions):
            if caption.strip():
                text_ids.append(caption_key(r.id, n))
                texts.append(caption.strip())
                text_to_image.append(i)
    scorer = RetrievalScorer(ev, image_ids, texts)
    i2t, t2i = scorer.rerank(config.k)  # (n_images, n_texts), (n_texts, n_images)
    metrics = retrieval_recall(i2t, text_to_image, sim_t2i=t2i.T)
    top_t = i2t.topk(min(10, len(texts)), dim=1).indices
    top_i = t2i.topk(min(10, len(image_ids)), dim=1).indices
    _write(ev, "predictions.json", {
        "image_to_text": [{"image_id": i, "top10": [text_ids[j] for j in row]}
                          for i, row in zip(image_ids, top_t.tolist())],
        "text_to_image": [{"text_id": t, "text": x, "top10": [image_ids[j] for j in row]}
                          for t, x, row in zip(text_ids, texts, top_i.tolist())]})
    return _finish(ev, metrics, {"images": len(image_ids), "texts": len(texts), "k": min(config.k, len(texts))}, None)


# ---------------------------------------------------------------- shared steps

def _open(config: EvalConfig, task: str) -> Evaluation:
    for name in ("adapter", "features", "data"):
        if not getattr(config, name):
            raise BlitextError(f"eval {task} needs --{name}")
    require_settings(config.settings)  # before any model loads
    check_out(config.out)
    device = use_device(config.device)
    adapter = load_adapter(config.adapter, device)
    encoder = adapter.features_producer.get("encoder")
    cache = FeatureCache(config.features, expect=adapter.features_producer,
                         fix=f"extract the evaluation images' features with the adaptor's encoder "
                             f"(blitext extract-features --vision-encoder {encoder} --data {config.data})")
    out = Path(config.out) if config.out else default_eval_dir(adapter, task, config.data)
    return Evaluation(config, task, adapter, cache, out, device)


def default_eval_dir(adapter: LoadedAdapter, task: str, data: str) -> Path:
    """<run>/eval/<task>-<data name>; a checkpoint other than final adds its step."""
    folder, name = adapter.path, f"{task}-{Path(data).stem}"
    if folder.parent.name == "checkpoints":
        return folder.parent.parent / "eval" / f"{name}-{folder.name}"
    return (folder.parent if folder.name == "final" else folder) / "eval" / name


def _with_features(ev: Evaluation, image_ids: list[str]) -> list[str]:
    """The image ids to score: all of them, or with --skip-missing those the cache holds (the
    others counted in ev.skipped and metrics.json)."""
    if not image_ids:
        raise BlitextError(f"{ev.config.data} holds no image with a caption (or no question) to evaluate")
    missing = sorted({i for i in image_ids if i not in ev.cache})
    total = len(set(image_ids))
    where = f"{len(missing)} of {total} images of {ev.config.data} have no features in {ev.cache.root} " \
            f"(first: {missing[0]!r})" if missing else ""
    if missing and (not ev.config.skip_missing or len(missing) == total):
        raise BlitextError(f"{where}: extract-features on this data (failed images are listed in its manifest), "
                           f"pass the cache made from it, or pass --skip-missing to score the others")
    if missing:
        say(f"[yellow]skipped[/] {where}: scoring the other {total - len(missing)} (--skip-missing)")
    ev.skipped = len(missing)
    return [i for i in image_ids if i in ev.cache]


def _settings(config: EvalConfig, task: str, adapter: LoadedAdapter) -> GenerationSettings:
    settings = GenerationSettings.for_task(task, trained_settings(adapter, config.settings), prompt=config.prompt,
                                           num_beams=config.num_beams,
                                           max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
                                           length_penalty=config.length_penalty, blank_start=config.blank_start)
    if settings.min_new_tokens > settings.max_new_tokens:
        raise BlitextError(f"--min-new-tokens {settings.min_new_tokens} > --max-new-tokens {settings.max_new_tokens}: "
                           f"lower --min-new-tokens (or raise --max-new-tokens)")
    return settings


def _generate(ev: Evaluation, llm, settings: GenerationSettings, image_ids: list[str], texts: list[str],
              unit: str) -> list[str]:
    """One generation per (image, text prompt), batch_size at a time."""
    bs, outputs = ev.config.batch_size, []
    with progress_bar(len(image_ids), f"eval {ev.task}", unit) as advance:
        for start in range(0, len(image_ids), bs):
            features, mask = ev.cache.get_batch(image_ids[start:start + bs])  # (B, T, D), (B, T) | None
            outputs += generate_texts(ev.adapter, llm, features, mask, texts[start:start + bs], settings)
            advance(len(features))
    return outputs


def _write_answers(ev: Evaluation, name: str, records, answers: list[str]) -> None:
    _write(ev, name, [{"question_id": coco_id(r.question_id), "answer": a} for r, a in zip(records, answers)])


def _write(ev: Evaluation, name: str, obj) -> None:
    """A result file, whole or not at all; a full disk or unwritable --out is one line."""
    with writing(ev.out, then="run the same eval again (with another --out, or after freeing space)"):
        write_json(ev.out / name, obj)


# ---------------------------------------------------------------- VQA's text ceiling

def question_captions(config: EvalConfig, records) -> tuple[list[str] | None, str]:
    """(each question's caption: its image's first non-blank one, the caption file), or (None, why
    there are none). A --captions file that cannot be read is an error; a missing default is not."""
    path = Path(config.captions) if config.captions else default_captions(Path(config.data))
    if path is None:
        return None, (f"no captions: pass --captions (no captions_<split>.json beside {config.data}, <split> "
                      f"a _-separated part of its name)")
    try:
        by_id = {r.id: next((c.strip() for c in r.captions if c.strip()), "") for r in read_image_set(path).records}
    except BlitextError as e:
        if config.captions:
            raise BlitextError(f"--captions: {e}") from None
        return None, f"cannot read {path}: {e}"
    missing = [r.image_id for r in records if not by_id.get(r.image_id)]
    if missing:
        return None, (f"{len(missing)} of {len(records)} questions are about images with no caption in {path} "
                      f"(first: {missing[0]!r})")
    return [by_id[r.image_id] for r in records], str(path)


def default_captions(questions: Path) -> Path | None:
    """captions_<part>.json beside the questions file for the first _-separated part of its name
    that has one: vqa_test_questions.json -> captions_test.json (blitext data prepare's layout)."""
    for part in questions.stem.split("_"):
        if part and (questions.parent / f"captions_{part}.json").is_file():
            return questions.parent / f"captions_{part}.json"
    return None


def _ceiling_and_base_rate(ev: Evaluation, llm, settings: GenerationSettings, records, texts: list[str],
                           captions: tuple[list[str] | None, str]) -> dict:
    """metrics.json's text_ceiling, base_rate and ceiling_verdict."""
    if not any(r.answers for r in records):
        return {"text_ceiling": {"unavailable": "the questions have no answers to score it against"}}
    ceiling = _text_ceiling(ev, llm, settings, records, texts, captions)
    base = vqa_metrics(records, majority_answers(records), ev.config.vqa_normalise)
    return {"text_ceiling": ceiling, "base_rate": base, "ceiling_verdict": ceiling_verdict(ceiling, base)}


def _text_ceiling(ev: Evaluation, llm, settings: GenerationSettings, records, texts: list[str],
                  captions: tuple[list[str] | None, str]) -> dict:
    """The same LLM, prompt and decoding with [caption + separator] where the soft prompts go,
    scored as the adaptor's answers; ceiling_predictions.json holds its answers."""
    if captions[0] is None:
        return {"unavailable": captions[1]}
    contexts, source = [c + CEILING_SEPARATOR for c in captions[0]], captions[1]
    bs, answers = ev.config.batch_size, []
    with progress_bar(len(records), "eval vqa: text ceiling", "question") as advance:
        for start in range(0, len(records), bs):
            answers += generate_from_text(llm, contexts[start:start + bs], texts[start:start + bs], settings,
                                          ev.adapter.end_of_text)
            advance(len(contexts[start:start + bs]))
    _write_answers(ev, "ceiling_predictions.json", records, answers)
    return {"metrics": vqa_metrics(records, answers, ev.config.vqa_normalise), "questions": len(records),
            "captions": source, "separator": CEILING_SEPARATOR,
            "format": "{caption}" + CEILING_SEPARATOR + settings.prompt}


def ceiling_verdict(ceiling: dict, base: dict) -> dict | None:
    """{"near_floor", "line"}: does the ceiling clear the base rate by CEILING_MARGIN points (None
    without a ceiling)? Below it the adaptor's VQA score is noise around what the LLM can do at all."""
    if "metrics" not in ceiling:
        return None
    top, floor = ceiling["metrics"]["accuracy"], base["accuracy"]
    if top < floor + CEILING_MARGIN:
        return {"near_floor": True, "line": f"the LLM cannot answer these questions even from the caption as text "
                f"({top:.1f} against {floor:.1f} for always giving the majority answer): the VQA score cannot "
                f"show anything about the adaptor"}
    return {"near_floor": False, "line": f"the LLM answers {top:.1f} from the caption as text, {top - floor:.1f} "
            f"points above the majority answer's {floor:.1f}: the VQA score can show what the prompts carry"}


def captions_current(folder: Path) -> bool:
    """Whether `folder` holds a caption evaluation a recipe may reuse: one made before metrics that
    measure nothing on its captions (BLEU-4 over 3-word captions) were marked undefined is redone,
    or the recipe's table would print their numbers as results."""
    record = _record(folder)
    return record is not None and "undefined" in record


def answers_current(folder: Path, **overrides) -> bool:
    """Whether `folder` holds a VQA evaluation that decoded as eval_vqa decodes now with these
    generation overrides (num_beams=..., None: the default), so a recipe may reuse it: one made
    before answers stopped starting with a blank token (its settings lack blank_start) is not, as
    up to a third of its answers were empty."""
    record = _record(folder)
    if record is None:
        return False
    wanted = to_jsonable(GenerationSettings.for_task("vqa", **overrides))
    return {"blank_start": True, **(record.get("settings") or {})} == wanted  # before it, answers could start blank


def _record(folder: Path) -> dict | None:
    """The metrics.json an evaluation wrote into `folder`, or None."""
    file = folder / "metrics.json"
    return read_json(file) if file.is_file() else None


def _finish(ev: Evaluation, metrics: dict, counts: dict, settings: GenerationSettings | None, **extra) -> dict:
    """Write metrics.json, print the table, return what was written."""
    counts = {**counts, "skipped_no_features": ev.skipped} if ev.skipped else counts
    record = {"task": ev.task, "eval": f"{ev.task}-{Path(ev.config.data).stem}", "metrics": metrics, **extra,
              "counts": counts, "settings": to_jsonable(settings) if settings else None,
              "adapter": str(ev.adapter.path), "adapter_fingerprint": ev.adapter.fingerprint,
              "features": str(ev.cache.root), "data": ev.config.data, "provenance": provenance(ev.config)}
    _write(ev, "metrics.json", record)
    sizes = ", ".join(f"{k} {v}" for k, v in counts.items())
    print_metrics(f"eval {ev.task}: {Path(ev.config.data).name} ({sizes})", metrics, beside_scores(record),
                  undefined=extra.get("undefined"))
    say_unscored(extra)
    if "answer_normalisation" in extra:
        say(f"answer normalisation: {extra['answer_normalisation']} (--vqa-normalise official|both)")
    ceiling = extra.get("text_ceiling", {})
    if "unavailable" in ceiling:
        say(f"[yellow]{CEILING} not computed[/]: {ceiling['unavailable']}")
    if verdict := extra.get("ceiling_verdict"):
        say(f"[{'yellow' if verdict['near_floor'] else 'green'}]text ceiling[/]: {verdict['line']}")
    also = " and ceiling_predictions.json" if "metrics" in ceiling else ""
    say(f"[green]written[/] {ev.out}/metrics.json, predictions.json{also}")
    return record
