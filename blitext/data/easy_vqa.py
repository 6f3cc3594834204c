"""easy-VQA (PyPI easy-vqa 1.0) as a blitext dataset: the images, a caption composed from each
image's own answers ("a blue circle"), and its questions as VQAv2 JSON (prepare.py registers it)."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from blitext.data.readers import write_lavis_json
from blitext.data.records import ImageRecord, VQARecord
from blitext.data.vqa import write_vqa_json
from blitext.errors import BlitextError

EASY_VQA_COLOURS = {  # the exact RGB values easy-VQA paints its shapes with (checked on all 5,000)
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
    "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42), "yellow": (255, 255, 0),
}
EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
# The default withheld split: 6 of the 24 colour x shape combinations, each colour and each shape
# still seen in other combinations, so a withheld caption is a new combination of known words.
DEFAULT_WITHHELD = ("red circle", "blue rectangle", "green triangle", "yellow circle", "gray triangle",
                    "brown rectangle")
ALL_CAPTIONS_FILE = "captions_all_combinations.txt"  # text only: every combination, for the P-Former


def find_easy_vqa(source: Path | None) -> Path:
    if source is None:
        spec = importlib.util.find_spec("easy_vqa")
        if spec is None or not spec.submodule_search_locations:
            raise BlitextError("the easy-VQA data comes from the PyPI package easy-vqa, which is not installed: "
                               "run `pip install easy-vqa==1.0`")
        source = Path(spec.submodule_search_locations[0])
    data = source / "data" if (source / "data" / "train").is_dir() else source
    if not (data / "train" / "questions.json").is_file():
        raise BlitextError(f"{source}: not an easy-VQA data folder (expected train/questions.json and "
                           f"train/images/, test/...); pass the easy_vqa package folder or its data/ folder")
    return data


def build_easy_vqa(data: Path, out: Path, limit: int | None, withhold: tuple[str, ...] = (),
                   test_limit: int | None = None) -> dict:
    """Both splits; with `withhold` ("red circle", ...) those combinations never appear among the
    train images, the test captions are also written apart as seen / withheld, and a text file of
    every combination is written for the P-Former (the text that covers what the pairs lack)."""
    withheld = parse_withheld(withhold)
    counts = {"train": _build_easy_vqa_split(data / "train", "train", out, limit, withheld),
              "test": _build_easy_vqa_split(data / "test", "test", out, test_limit or limit, set())}
    if withheld:
        _write_seen_and_withheld(out, withheld, counts)
        (out / ALL_CAPTIONS_FILE).write_text("".join(f"a {c} {s}\n" for c in EASY_VQA_COLOURS
                                                     for s in EASY_VQA_SHAPES))
        counts["withheld"] = sorted(" ".join(pair) for pair in withheld)
    return counts


def parse_withheld(names: tuple[str, ...] | list[str]) -> set[tuple[str, str]]:
    """("red circle", ...) -> {("red", "circle"), ...}; "default" stands for DEFAULT_WITHHELD."""
    names = [n for name in names for n in (DEFAULT_WITHHELD if name == "default" else [name])]
    pairs = set()
    for name in names:
        words = name.lower().split()
        if len(words) != 2 or words[0] not in EASY_VQA_COLOURS or words[1] not in EASY_VQA_SHAPES:
            raise BlitextError(f"--withhold {name!r}: name a colour and a shape, e.g. 'red circle' "
                               f"(colours: {', '.join(EASY_VQA_COLOURS)}; shapes: {', '.join(EASY_VQA_SHAPES)}), "
                               f"or 'default' for {', '.join(DEFAULT_WITHHELD)}")
        pairs.add((words[0], words[1]))
    if len(pairs) >= len(EASY_VQA_COLOURS) * len(EASY_VQA_SHAPES):
        raise BlitextError("--withhold names every colour x shape combination: keep at least one for training")
    return pairs


def _write_seen_and_withheld(out: Path, withheld: set[tuple[str, str]], counts: dict) -> None:
    """captions_test_seen.json and captions_test_withheld.json: the test images split by combination."""
    entries = json.loads((out / "captions_test.json").read_text())
    for part, keep in (("seen", False), ("withheld", True)):
        chosen = [e for e in entries if ((e["color"], e["shape"]) in withheld) == keep]
        (out / f"captions_test_{part}.json").write_text(json.dumps(chosen))
        counts["test"][f"{part}_images"] = len(chosen)


def _build_easy_vqa_split(split_dir: Path, split: str, out: Path, limit: int | None,
                          withheld: set[tuple[str, str]]) -> dict:
    questions = _easy_vqa_questions(split_dir / "questions.json")
    image_ids = sorted(int(p.stem) for p in (split_dir / "images").glob("*.png") if p.stem.isdigit())
    orphans = sorted({i for _q, _a, i in questions} - set(image_ids))
    if orphans:
        raise BlitextError(f"{split_dir / 'questions.json'}: questions refer to images missing from "
                           f"{split_dir / 'images'} (ids {orphans[:5]}); reinstall easy-vqa")
    asked = defaultdict(list)
    for index, (question, answer, image_id) in enumerate(questions):
        asked[image_id].append((index, question, answer))
    (out / "images" / split).mkdir(parents=True)
    records, vqa, dropped = [], [], 0
    for image_id in image_ids:  # the lowest ids (not withheld): the same subset every time
        if limit and len(records) == limit:
            break
        colour, shape = _describe_easy_vqa_image(split_dir / "images" / f"{image_id}.png",
                                                 [(q, a) for _i, q, a in asked[image_id]])
        if (colour, shape) in withheld:
            dropped += 1
            continue
        ref = f"images/{split}/{image_id}.png"
        shutil.copyfile(split_dir / "images" / f"{image_id}.png", out / ref)
        records.append(ImageRecord(f"{split}-{image_id}", ref, (f"a {colour} {shape}",),
                                   {"color": colour, "shape": shape}))
        # Each question has one answer; repeating it as VQAv2's 10 human answers makes VQAv2's
        # accuracy min(#humans agreeing / 3, 1) exactly 1 or 0, i.e. exact match.
        vqa += [(index, VQARecord(f"{split}-{index}", f"{split}-{image_id}", ref, q, (a,) * 10,
                                  "yes/no" if a in ("yes", "no") else "other"))
                for index, q, a in asked[image_id]]
    write_lavis_json(out / f"captions_{split}.json", records)
    write_vqa_json(out / f"vqa_{split}_questions.json", out / f"vqa_{split}_annotations.json",
                   [r for _index, r in sorted(vqa, key=lambda pair: pair[0])])
    return {"images": len(records), "questions": len(vqa), **({"withheld_images_skipped": dropped} if withheld else {})}


def _easy_vqa_questions(path: Path) -> list[tuple[str, str, int]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BlitextError(f"{path}: cannot read easy-VQA questions ({e}); reinstall easy-vqa") from None
    for row, item in enumerate(rows if isinstance(rows, list) else [None]):
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[2], int)):
            raise BlitextError(f"{path} entry {row}: expected [question, answer, image_id], got {item!r:.80}")
    return [(str(q), str(a), i) for q, a, i in rows]


def _describe_easy_vqa_image(path: Path, qa: list[tuple[str, str]]) -> tuple[str, str]:
    """(colour, shape) from the image's own answers; pixels fill in what no question asked.

    About 7% of images have no question that pins down the colour and 4% none for the shape,
    so the painted colour and the shape's outline are read from the pixels for those, and
    checked against the answers for every image where both exist.
    """
    said = _easy_vqa_facts(qa)
    seen = _easy_vqa_pixels(path)
    described = []
    for vocabulary, read in ((EASY_VQA_COLOURS, seen[0]), (EASY_VQA_SHAPES, seen[1])):
        told = sorted(said & set(vocabulary))
        if len(told) > 1 or (told and read and told[0] != read):
            raise BlitextError(f"{path}: its answers say {told} but its pixels show {read!r}; "
                               f"the easy-vqa data looks altered: reinstall easy-vqa")
        described.append(told[0] if told else read)
    if None in described:
        raise BlitextError(f"{path}: cannot tell the shape's colour and kind from its questions {qa} "
                           f"or its pixels; reinstall easy-vqa")
    return described[0], described[1]


def _easy_vqa_facts(qa: list[tuple[str, str]]) -> set[str]:
    """Colour and shape words the answers say are present in the image."""
    vocabulary = set(EASY_VQA_COLOURS) | set(EASY_VQA_SHAPES)
    present = set()
    for question, answer in qa:
        words = set(re.findall(r"[a-z]+", question.lower()))
        if answer in ("yes", "no"):
            # "is there not a red shape?" answered "no" means a red shape is there.
            if (answer == "yes") != bool(words & {"not", "no"}):
                present |= words & vocabulary
        else:  # "what color is the circle?" -> "blue": both words hold
            present |= (words & vocabulary) | {answer}
    return present


def _easy_vqa_pixels(path: Path) -> tuple[str | None, str | None]:
    """The painted colour (exact RGB) and the shape, from how it fills its bounding box."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    masks = {name: np.all(rgb == value, axis=-1) for name, value in EASY_VQA_COLOURS.items()}
    colour = max(masks, key=lambda name: int(masks[name].sum()))
    mask = masks[colour]
    if mask.sum() < 8:  # the smallest real shape has 12 exact pixels; less is not a shape
        return None, None
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    # Measured on all 5,000 images: rectangles fill their box exactly (1.0); triangles have one
    # half of the box at least 0.35 heavier than the other, circles at most 0.13.
    if box.mean() > 0.95:
        return colour, "rectangle"
    return colour, "triangle" if max(_imbalance(box), _imbalance(box.T)) > 0.25 else "circle"


def _imbalance(box: np.ndarray) -> float:
    half = box.shape[0] // 2
    return abs(int(box[:half].sum()) - int(box[-half:].sum())) / max(int(box.sum()), 1) if half else 0.0
