"""`blitext ablate`: the paper's Table 4 (alignment weights w1, w2) and Table 6 (P-Former text size)
on any prepared data set, in miniature.

Mirrors demo.py phase by phase (prepare, extract, P-Former, reference prompts, Q-Former stage 1
and 2, evaluation) and reuses every finished phase the same way (`demo.train_once`):

- Table 4: one stage-1 run per distinct w1 (the cells (0,0)/(0,100) share the w1 = 0 run,
  (10,0)/(10,100) the w1 = 10 run), then one stage-2 run per cell, initialised from its w1's
  stage 1. A w1 = 0 stage 1 never sees a P-Former, so it is shared whatever the text.
- Table 6: P-Formers trained on the paired captions only and on paired + extra sentences
  (default extra: blitext.data.compose's 1,200 compositional captions, plus the ~48k quoted
  example sentences of WordNet when Debian's `wordnet-base` is installed), each with its own
  prompt cache and a (10, 100) adaptor. Both P-Formers get the same steps (compute-matched;
  the paper trained 5 epochs of each set). The grid uses the largest text set, as the paper's
  Table 4 uses its 12M sentences.

Evaluation is data-generic: zero-shot VQA only when the data holds vqa_test_questions.json
(+ vqa_test_annotations.json for scores), captioning on captions_test.json when present, else
on a seeded held-out slice of the train images (never trained on; the output says which).
Every seed (`seeds`) trains its own P-Formers, held-out split and adaptors in `seed-<n>/` of one run
folder; beside them `ablation.json` and `ablation.md` hold each seed's rows, each cell's mean and sample
std over seeds, its paired sign test against (0, 0) per caption image and VQA question (pooled over
seeds), its budget curve (greedy captions at stage-2 step 0, each snapshot and the end; steps to 0.85
exact) and one verdict line; `budget-curve.png` and each seed's loss curves beside them.

Sized for a 2-core CPU at about an hour a seed (2 P-Formers, 3 stage-1 and 5 stage-2 runs, 5
evaluations and the budget curve's points, at the demo's settings: 63 min for seed 42 of the run in
docs/results.md, with other jobs beside it at the lowest priority); `scale`
multiplies steps and evaluation sizes; SMOKE runs every phase in minutes (2 steps each, greedy
decoding, no METEOR).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import time
from dataclasses import replace
from pathlib import Path

from blitext.adapter.image import train_adapter
from blitext.atomic import read_json, write_json, write_text
from blitext.config import default_cache_root, provenance, to_jsonable
from blitext.console import say
from blitext.data.compose import compositional_captions
from blitext.data.prepare import list_datasets, prepare_dataset
from blitext.data.readers import read_image_set, write_lavis_json
from blitext.data.text import WORDNET_DIR, read_sentences, wordnet_examples
from blitext.recipes.ablate_config import TEXT_SIZE_CELL, TRAIN_KEYS, AblateConfig, Cell, Extra, Source, Splits
from blitext.recipes.ablate_report import budget_curve, evaluate_run, report, score_columns, plot_curves
from blitext.recipes.ablate_seeds import cell_label
from blitext.recipes.demo import print_prompt_check
from blitext.recipes.recipe import adapter_base, pformer_config, stage1_config, stage2_config, train_once
from blitext.errors import BlitextError
from blitext.features.image import ExtractConfig, extract_features
from blitext.models.registry import DEFAULT_VISION_ENCODER
from blitext.pformer.train import train_pformer
from blitext.pformer.prompts import BuildPromptsConfig, build_prompts

def _source(c: AblateConfig, root: Path) -> Source:
    path = Path(c.data)
    if c.data in list_datasets():
        tag = f"{c.data}-{c.images_per_split}"  # the demo's names: its prepared data and features are shared
        path = prepare_dataset(c.data, out_root=root / "data" / tag, limit=c.images_per_split)
    elif not path.exists() and (root / "data" / c.data).is_dir():
        path, tag = root / "data" / c.data, c.data
    elif not path.exists():
        raise BlitextError(f"--data {c.data!r} is neither a data set blitext prepares ({', '.join(list_datasets())}) "
                           f"nor a folder or caption JSON: pass one of those")
    else:
        tag = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem if path.is_file() else path.name)
    if path.is_file():
        return Source(tag, path, path, None, None)
    train = next((path / n for n in ("captions_train.json", "captions.json") if (path / n).is_file()), None)
    if train is None:
        raise BlitextError(f"{path} holds neither captions_train.json nor captions.json: pass a prepared data set "
                           f"(blitext data prepare NAME) or a caption JSON")
    test = path / "captions_test.json"
    questions, answers = path / "vqa_test_questions.json", path / "vqa_test_annotations.json"
    vqa = (questions, answers if answers.is_file() else None) if questions.is_file() else None
    return Source(tag, path, train, test if test.is_file() else None, vqa)


def _features(c: AblateConfig, src: Source, root: Path) -> Path:
    if c.features:
        if not Path(c.features).is_dir():
            raise BlitextError(f"--features {c.features} is not a folder: pass a cache from extract-features, "
                               f"or leave it out to extract the data's features")
        return Path(c.features)
    features = root / "features" / f"{src.tag}__{DEFAULT_VISION_ENCODER}"
    extract_features(ExtractConfig(data=str(src.path), out=str(features)))
    return features


def _splits(c: AblateConfig, src: Source, work: Path, seed: int) -> Splits:
    """Test captions when the data has them; else a held-out slice of the train images drawn with `seed`."""
    records = read_image_set(src.train).records
    if src.test is not None:
        return Splits(src.train, src.test, f"{src.test.name} (test images)", src.vqa, *_count(records))
    if not 2 <= c.heldout_images <= len(records) // 2:
        raise BlitextError(f"{src.train} has {len(records)} images and no captions_test.json: the images held out "
                           f"for captioning (heldout_images {c.heldout_images}) must be 2..{len(records) // 2}")
    held = set(random.Random(seed).sample(range(len(records)), c.heldout_images))
    train, heldout = work / "split" / "captions_train.json", work / "split" / "captions_heldout.json"
    write_lavis_json(train, [r for i, r in enumerate(records) if i not in held])
    write_lavis_json(heldout, [r for i, r in enumerate(records) if i in held])
    kept = [r for i, r in enumerate(records) if i not in held]
    return Splits(train, heldout, f"{c.heldout_images} held-out train images of {src.train.name} (no test split)",
                  src.vqa, *_count(kept))


def _count(records) -> tuple[int, int]:
    """(captions, distinct captions)."""
    captions = [caption.strip() for r in records for caption in r.captions if caption.strip()]
    return len(captions), len(set(captions))


# ---------------------------------------------------------------- extra sentences (Table 6)

def _extra(c: AblateConfig) -> Extra:
    if c.extra_text:
        corpus = read_sentences(c.extra_text)
        sentences, sources = corpus.sentences, corpus.files
    else:
        sentences, sources = compositional_captions(), ["blitext.data.compose compositional captions"]
        examples = wordnet_examples()
        if examples:
            sentences, sources = sentences + examples, sources + [f"WordNet examples ({WORDNET_DIR})"]
        else:
            say(f"[yellow]no WordNet[/] in {WORDNET_DIR}: extra text is the compositional captions only "
                f"(apt-get install wordnet-base adds ~48k example sentences)")
    return Extra(sentences, sources, hashlib.sha1("\n".join(sentences).encode()).hexdigest()[:12])


def _extra_file(work: Path, extra: Extra, n: int, seed: int) -> Path:
    """n of the extra sentences (all of them, or a seeded sample) in a text file."""
    path = work / "text" / f"extra-{n}.txt"
    if not path.is_file():
        chosen = extra.sentences if n == len(extra.sentences) else random.Random(seed).sample(extra.sentences, n)
        write_text(path, "\n".join(chosen) + "\n")
    return path


def _label(extra: int | None) -> str:
    return "none (BLIP-2)" if extra is None else "paired" if extra == 0 else f"paired+{extra}"


# ---------------------------------------------------------------- the plan

def plan_cells(c: AblateConfig, n_extra: int) -> list[Cell]:
    """The grid with the largest text set, then Table 6's (10, 100) cell for each other text size."""
    return list(dict.fromkeys(_grid_cells(c, n_extra) + _text_cells(c, n_extra)))


def _grid_cells(c: AblateConfig, n_extra: int) -> list[Cell]:
    return [Cell(w1, w2, n_extra if (w1 or w2) else None) for w1, w2 in c.grid]


def _text_cells(c: AblateConfig, n_extra: int) -> list[Cell]:
    if c.text_sizes is False:
        return []
    sizes = [0, n_extra] if c.text_sizes is True else c.text_sizes
    bad = [n for n in sizes if not 0 <= n <= n_extra]
    if bad:
        raise BlitextError(f"text sizes {bad}: each must be 0..{n_extra}, the number of extra sentences")
    return [Cell(*TEXT_SIZE_CELL, n) for n in sizes]


def _work(c: AblateConfig, src: Source, features: Path, extra: Extra, root: Path) -> Path:
    """The run folder (one seed-<n> folder a seed inside); refuses one made with other settings (its runs
    would be reused as if equal)."""
    identity = {"data": src.tag, "features": features.name, "extra_text_sha1": extra.digest,
                **{k: to_jsonable(getattr(c, k)) for k in TRAIN_KEYS}}
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    work = Path(c.out) if c.out else root / "runs" / "ablate" / (
        f"{src.tag}-{c.recipe.n_prompt}q-{c.recipe.pformer_steps}-{c.recipe.stage1_steps}-{c.recipe.stage2_steps}-{digest}")
    record = work / "ablate-config.json"
    if record.is_file() and read_json(record).get("identity") != identity:
        old = read_json(record).get("identity") or {}
        differ = sorted(k for k in identity if old.get(k) != identity[k])
        raise BlitextError(f"{work} holds an ablation made with other settings ({', '.join(differ)}): its runs "
                           f"would be reused as if equal; pass another --out or remove that folder")
    write_json(record, {"identity": identity, **provenance(c)})
    return work


# ---------------------------------------------------------------- training

def _pformer(c: AblateConfig, seed: int, work: Path, splits: Splits, extra: Extra, n: int) -> Path:
    """Train one P-Former (paired captions + n extra sentences) and cache its reference prompts."""
    label = _label(n)
    run, prompts = work / f"pformer-{label}", work / f"prompts-{label}"
    text = [str(splits.train)] + ([str(_extra_file(work, extra, n, seed))] if n else [])
    say(f"[bold]P-Former ({label})[/]: {splits.n_paired} paired captions + {n} extra sentences")
    steps = c.recipe.pformer_steps
    train_once(run, lambda resume: train_pformer(pformer_config(
        c.recipe, text, run, heldout=_pformer_heldout(splits), seed=seed, resume=resume,
        sample_every=max(1, steps // 2, min(steps, 20)))))  # mid-run and at the end; SMOKE: the end
    build_prompts(BuildPromptsConfig(pformer=str(run / "final"), captions=[str(splits.train)], out=str(prompts)))
    print_prompt_check(prompts)
    return prompts


def _pformer_heldout(splits: Splits) -> int:
    """Sentences the P-Former never trains on (for its printed samples): few, as each one held out of the
    paired captions gets an untrained reference prompt (easy-VQA has only 24 distinct captions: 1)."""
    return max(1, min(32, splits.n_distinct // 16))


def _adaptor(c: AblateConfig, seed: int, work: Path, cell: Cell, features: Path, splits: Splits,
             prompts: dict[int, Path]) -> tuple[Path, Path]:
    """Stage 1 with w1 (shared by the cells of equal w1 and P-Former), then stage 2 with w2 from it."""
    ref = prompts.get(cell.extra)
    base = adapter_base(c.recipe, features, ref, [str(splits.train)], seed)
    s1 = work / (f"stage1-w1_{cell.w1:g}" + (f"-{_label(cell.extra)}" if cell.w1 else ""))
    say(f"[bold]stage 1, w1 = {cell.w1:g}[/] ({s1.name})")
    train_once(s1, lambda resume: train_adapter(stage1_config(
        c.recipe, replace(base, prompts=base.prompts if cell.w1 else None), cell.w1, s1, resume)))
    s2 = work / (f"stage2-w1_{cell.w1:g}-w2_{cell.w2:g}" + (f"-{_label(cell.extra)}" if ref else ""))
    say(f"[bold]stage 2, w2 = {cell.w2:g}[/] ({s2.name}, from {s1.name})")
    train_once(s2, lambda resume: train_adapter(stage2_config(c.recipe, base, cell.w2, s1, s2, resume)))
    return s1, s2


# ---------------------------------------------------------------- the whole job

def run_ablation(config: AblateConfig) -> dict:
    """Every phase in order, seed by seed; returns (and writes to ablation.json) one row per cell and seed,
    each cell's aggregates over seeds and the verdict lines."""
    c, root, started = config.scaled(), default_cache_root(), time.perf_counter()
    say(f"[bold]1/6 data[/] {c.data}")
    src = _source(c, root)
    say("[bold]2/6 features[/] (the bundled EfficientNet-Lite0 unless --features)")
    features = _features(c, src, root)
    extra = _extra(c)
    work = _work(c, src, features, extra, root)
    cells = plan_cells(c, len(extra.sentences))
    rows, sources = [], []
    for seed in c.seeds:
        splits = _splits(c, src, work / f"seed-{seed}", seed)
        rows += _one_seed(c, seed, work / f"seed-{seed}", cells, features, splits, extra)
        sources.append(splits.caption_source)
    result = {"out": str(work), "data": src.tag, "seeds": c.seeds, "caption_source": sources[0],
              "vqa": bool(src.vqa and c.vqa_questions > 0), "extra_text": extra.sources,
              "n_extra": len(extra.sentences), "rows": rows,
              "counts": {"vqa_questions": c.vqa_questions, "caption_images": c.caption_images}}
    say(f"[bold]6/6 results[/] over seeds {', '.join(map(str, c.seeds))}")
    report(work, result)
    say(f"[green]ablation finished[/] in {(time.perf_counter() - started) / 60:.1f} min: {work}")
    return result


def _one_seed(c: AblateConfig, seed: int, work: Path, cells: list[Cell], features: Path, splits: Splits,
              extra: Extra) -> list[dict]:
    """One seed's P-Formers, adaptors and evaluations (the table's scores and the budget curve); its rows."""
    texts = sorted({x.extra for x in cells} - {None})
    say(f"[bold]3/6 P-Formers[/] for {len(texts)} text size(s), seed {seed}")
    prompts = {n: _pformer(c, seed, work, splits, extra, n) for n in texts}
    say(f"[bold]4/6 adaptors[/]: {len(cells)} cells, {len({(x.w1, x.extra if x.w1 else None) for x in cells})} "
        f"distinct stage-1 runs, seed {seed}")
    runs = {cell: _adaptor(c, seed, work, cell, features, splits, prompts) for cell in cells}
    say(f"[bold]5/6 evaluate[/] seed {seed}: captions of {splits.caption_source}"
        + (", zero-shot VQA on the test questions" if splits.vqa else ", no VQA files in the data")
        + "; the budget curve (greedy captions at stage-2 step 0, each snapshot and the end)")
    rows = [_row(c, seed, cell, runs[cell], splits, len(extra.sentences), features) for cell in cells]
    plot_curves(work, rows)
    return rows


def _row(c: AblateConfig, seed: int, cell: Cell, run: tuple[Path, Path], splits: Splits, n_extra: int,
         features: Path) -> dict:
    metrics, folders = evaluate_run(run[1], features, splits, c)
    text_cells = _text_cells(c, n_extra)
    tables = [t for t, on in (("4", cell in _grid_cells(c, n_extra)),
                              ("6", cell in text_cells or (bool(text_cells) and cell == Cell(0.0, 0.0, None)))) if on]
    return {"cell": cell_label(cell.w1, cell.w2, _label(cell.extra)), "seed": seed, "w1": cell.w1, "w2": cell.w2,
            "pformer_text": _label(cell.extra),
            "pformer_sentences": None if cell.extra is None else splits.n_paired + cell.extra,
            "paper_table": ", ".join(tables), "stage1": str(run[0]), "stage2": str(run[1]),
            "scores": score_columns(metrics), "metrics": metrics, "eval": folders,
            "curve": budget_curve(run, features, splits, c)}
