"""`blitext ablate`'s settings and the plan's types: AblateConfig (every default, written once),
the grid of (w1, w2) cells, SMOKE, and what the data holds (Source, Splits, Extra, Cell)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from blitext.errors import BlitextError
from blitext.recipes.recipe import Recipe

TABLE4_GRID = ((0.0, 0.0), (10.0, 0.0), (0.0, 100.0), (10.0, 100.0))  # the paper's (w1, w2) rows
TEXT_SIZE_CELL = (10.0, 100.0)          # Table 6 trains each P-Former's adaptor with the default weights
# What makes two runs comparable: a run folder is reused only under the same values (each seed has
# its own folder inside it, so adding a seed reuses the others).
TRAIN_KEYS = ("images_per_split", "heldout_images", "recipe")
RECIPE_OPTIONS = ("pformer_steps", "n_prompt", "stage1_steps", "stage1_lr", "stage2_steps", "stage2_lr", "batch_size")  # CLI -> Recipe


@dataclass
class AblateConfig:
    data: str = "easy-vqa"        # a data set blitext prepares (easy-vqa, tuxpaint, fashion-mnist), a folder with
                                  # captions_train.json or captions.json [+ captions_test.json, vqa_test_*.json],
                                  # or a caption JSON
    features: str | None = None   # feature cache of the data's images; default: extract into <cache root>/features/
    grid: list[tuple[float, float]] = field(default_factory=lambda: list(TABLE4_GRID))  # (w1, w2) cells (Table 4)
    text_sizes: bool | list[int] = True  # Table 6: True = paired captions only vs paired + all extra; a list =
                                  # extra-sentence counts (0 = paired only); False = the grid alone
    extra_text: list[str] | None = None  # extra sentence files (text, .jsonl, caption .json, globs), not the default
    images_per_split: int = 500   # when preparing a named data set: images per split (tuxpaint: in all)
    heldout_images: int = 100     # without captions_test.json: train images kept out for captioning
    recipe: Recipe = field(default_factory=Recipe)  # the P-Formers and the Q-Former's stages: the demo's recipe
    vqa_questions: int = 120      # test questions answered zero-shot per run (0: no VQA)
    caption_images: int = 50      # images captioned per run (0: no captioning)
    caption_max_new_tokens: int = 16  # short captions (easy-VQA 3-4 tokens, Tux Paint one sentence)
    num_beams: int | None = None  # generation beams; None = docs/method.md#generation-settings' 5 (SMOKE: 1, greedy)
    meteor: str = "auto"          # auto: METEOR when Java runs it | java | off
    seeds: list[int] = field(default_factory=lambda: [42])  # every cell trains once per seed (P-Formers, held-out
                                  # split and adaptors); aggregates and sign tests pool the seeds
    scale: float = 1.0            # multiplies every step count and evaluation size
    out: str | None = None        # run folder; default <cache root>/runs/ablate/<data>-<sizes>-<settings hash>

    def __post_init__(self) -> None:
        self.grid = parse_grid(self.grid) if isinstance(self.grid, str) else [_cell(c) for c in self.grid]
        if not self.grid:
            raise BlitextError("the grid is empty: pass at least one w1,w2 cell (e.g. --grid '0,0;10,100')")
        if isinstance(self.extra_text, str):
            self.extra_text = [self.extra_text]
        if not isinstance(self.text_sizes, bool):
            self.text_sizes = [int(n) for n in self.text_sizes]
        self.seeds = [int(s) for s in ([self.seeds] if isinstance(self.seeds, (int, str)) else self.seeds)]
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise BlitextError(f"seeds {self.seeds}: pass one or more distinct seeds (e.g. --seeds 42 --seeds 1)")

    def scaled(self) -> "AblateConfig":
        s = self.scale
        return replace(self, recipe=self.recipe.scaled(s),
                       vqa_questions=round(self.vqa_questions * s),
                       caption_images=round(self.caption_images * s), scale=1.0)


def parse_grid(text: str) -> list[tuple[float, float]]:
    """'0,0;10,100' -> [(0.0, 0.0), (10.0, 100.0)]."""
    return [_cell(part.split(",")) for part in text.replace(" ", "").split(";") if part]


def _cell(value) -> tuple[float, float]:
    value = value.split(",") if isinstance(value, str) else value
    try:
        w1, w2 = (float(w) for w in value)
    except (TypeError, ValueError):
        raise BlitextError(f"grid cell {value!r} is not two numbers w1,w2: write cells as '0,0;10,100'") from None
    if w1 < 0 or w2 < 0:
        raise BlitextError(f"grid cell ({w1:g}, {w2:g}): alignment weights must be >= 0")
    return w1, w2


SMOKE = AblateConfig(images_per_split=48, heldout_images=8,
                     recipe=Recipe(pformer_steps=2, pformer_batch_size=8, n_prompt=4, align_steps=2, stage1_steps=2, stage2_steps=2, batch_size=4, stage1_warmup_steps=1,
                                   stage2_warmup_steps=1, snapshot_steps=[1]), vqa_questions=8, caption_images=6,
                     caption_max_new_tokens=8, num_beams=1, meteor="off")


@dataclass
class Source:
    tag: str                       # names the feature cache and the run folder
    path: Path                     # the data folder or caption JSON (what extraction reads)
    train: Path                    # all train captions
    test: Path | None              # captions_test.json, when there
    vqa: tuple[Path, Path | None] | None  # (questions, annotations or None), when there


@dataclass
class Splits:
    train: Path                    # captions the P-Formers pair with and the adaptors train on
    captions: Path                 # captions scored
    caption_source: str            # where they come from, in words
    vqa: tuple[Path, Path | None] | None
    n_paired: int                  # train captions
    n_distinct: int                # distinct train captions (easy-VQA: 24)


@dataclass
class Extra:
    sentences: Sequence[str]       # a list, or read_sentences' column
    sources: list[str]
    digest: str


@dataclass(frozen=True)
class Cell:
    w1: float
    w2: float
    extra: int | None              # extra sentences of its P-Former; None when no P-Former is used (w1 = w2 = 0)
