"""Dataset preparation: real easy-VQA (small limit), and tiny fakes of the real Debian layouts."""
import gzip
import importlib.util
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blitext.data import prepare
from blitext.data.images import load_image
from blitext.data.easy_vqa import ALL_CAPTIONS_FILE, DEFAULT_WITHHELD
from blitext.data.prepare import list_datasets, prepare_dataset
from blitext.data.readers import read_image_set
from blitext.data.vqa import read_vqa
from blitext.errors import BlitextError

EASY_VQA_INSTALLED = importlib.util.find_spec("easy_vqa") is not None


def test_list_datasets_and_unknown_name(tmp_path):
    assert list_datasets() == ["easy-vqa", "tuxpaint", "fashion-mnist", "moving-shapes"]
    with pytest.raises(BlitextError, match="unknown dataset 'coco'; blitext can prepare: easy-vqa, tuxpaint, fashion"):
        prepare_dataset("coco", tmp_path)
    with pytest.raises(BlitextError, match="limit must be a positive number"):
        prepare_dataset("easy-vqa", tmp_path, limit=0)


# ---------------------------------------------------------------- easy-VQA (the real package)

def raw_easy_vqa(split):
    folder = Path(importlib.util.find_spec("easy_vqa").submodule_search_locations[0]) / "data" / split
    return json.loads((folder / "questions.json").read_text())


def answer_from_caption(question: str, caption_words: set[str]) -> str | None:
    """What a caption like 'a blue circle' implies for a yes/no question, independent of prepare."""
    words = set(re.findall(r"[a-z]+", question))
    mentioned = words & {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow",
                         "circle", "rectangle", "triangle"}
    present = mentioned <= caption_words
    return "yes" if present != bool(words & {"not", "no"}) else "no"


@pytest.fixture(scope="module")
def easy_vqa_dir(tmp_path_factory):
    if not EASY_VQA_INSTALLED:
        pytest.skip("easy-vqa is not installed")
    return prepare_dataset("easy-vqa", tmp_path_factory.mktemp("data"), limit=20)


def test_easy_vqa_captions_agree_with_every_raw_answer(easy_vqa_dir):
    for split in ("train", "test"):
        images = read_image_set(easy_vqa_dir / f"captions_{split}.json")
        assert images.root == easy_vqa_dir
        assert [r.id for r in images.records] == [f"{split}-{i}" for i in range(20)]
        by_id = {r.id: r for r in images.records}
        for question, answer, image_id in raw_easy_vqa(split):
            if image_id >= 20:
                continue
            record = by_id[f"{split}-{image_id}"]
            (caption,) = record.captions
            words = set(caption.split())
            assert re.fullmatch(r"a (red|green|blue|black|gray|teal|brown|yellow) (circle|rectangle|triangle)", caption)
            if answer in ("yes", "no"):
                assert answer_from_caption(question, words) == answer, (record, question, answer)
            else:
                assert answer in words, (record, question, answer)
        assert load_image(images.root, images.records[0].image).size == (64, 64)


def test_easy_vqa_questions_are_readable_vqav2(easy_vqa_dir):
    for split in ("train", "test"):
        records = read_vqa(easy_vqa_dir / f"vqa_{split}_questions.json",
                           easy_vqa_dir / f"vqa_{split}_annotations.json")
        raw = [(i, q, a, image) for i, (q, a, image) in enumerate(raw_easy_vqa(split)) if image < 20]
        assert [(r.question_id, r.question, r.image_id) for r in records] == [
            (f"{split}-{i}", q, f"{split}-{image}") for i, q, a, image in raw]
        for record, (_i, _q, answer, image) in zip(records, raw):
            assert record.answers == (answer,) * 10
            assert record.answer_type == ("yes/no" if answer in ("yes", "no") else "other")
            assert record.image == f"images/{split}/{image}.png" and (easy_vqa_dir / record.image).is_file()


def test_easy_vqa_second_call_does_not_rebuild_but_a_new_limit_does(easy_vqa_dir):
    marker = easy_vqa_dir / "prepared.json"
    stamps = (marker.stat().st_mtime_ns, (easy_vqa_dir / "captions_train.json").stat().st_mtime_ns)
    assert prepare_dataset("easy-vqa", easy_vqa_dir.parent, limit=20) == easy_vqa_dir
    assert (marker.stat().st_mtime_ns, (easy_vqa_dir / "captions_train.json").stat().st_mtime_ns) == stamps
    prepare_dataset("easy-vqa", easy_vqa_dir.parent, limit=5)
    assert len(read_image_set(easy_vqa_dir / "captions_test.json").records) == 5
    assert json.loads(marker.read_text())["limit"] == 5
    assert sorted(p.name for p in easy_vqa_dir.parent.iterdir()) == ["easy-vqa"]  # no temp folders left
    prepare_dataset("easy-vqa", easy_vqa_dir.parent, limit=20)  # leave it as the fixture made it


def test_easy_vqa_withheld_combinations_never_reach_the_train_images(tmp_path):
    if not EASY_VQA_INSTALLED:
        pytest.skip("easy-vqa is not installed")
    folder = prepare_dataset("easy-vqa", tmp_path, limit=40, withhold=("default", "teal circle"), test_limit=60)
    withheld = {tuple(n.split()) for n in (*DEFAULT_WITHHELD, "teal circle")}
    train = json.loads((folder / "captions_train.json").read_text())
    assert len(train) == 40 and not any((e["color"], e["shape"]) in withheld for e in train)
    kept = {e["image_id"] for e in train}
    questions = read_vqa(folder / "vqa_train_questions.json", folder / "vqa_train_annotations.json")
    assert {q.image_id for q in questions} == kept  # no question about a withheld image either
    test = json.loads((folder / "captions_test.json").read_text())
    seen = json.loads((folder / "captions_test_seen.json").read_text())
    held = json.loads((folder / "captions_test_withheld.json").read_text())
    assert len(test) == 60 and len(seen) + len(held) == 60 and held
    assert all((e["color"], e["shape"]) in withheld for e in held)
    assert not any((e["color"], e["shape"]) in withheld for e in seen)
    every = (folder / ALL_CAPTIONS_FILE).read_text().splitlines()  # the P-Former's text: every combination
    assert len(every) == 24 and {f"a {c} {s}" for c, s in withheld} <= set(every)
    marker = json.loads((folder / "prepared.json").read_text())
    assert marker["counts"]["withheld"] == sorted(" ".join(p) for p in withheld)
    assert marker["counts"]["train"]["withheld_images_skipped"] > 0
    assert prepare_dataset("easy-vqa", tmp_path, limit=40, withhold=("default", "teal circle"),
                           test_limit=60) == folder  # reused
    with pytest.raises(BlitextError, match="name a colour and a shape"):
        prepare_dataset("easy-vqa", tmp_path / "x", limit=4, withhold=("purple circle",))
    with pytest.raises(BlitextError, match="apply to easy-vqa only"):
        prepare_dataset("tuxpaint", tmp_path / "y", withhold=("default",))


# ---------------------------------------------------------------- Tux Paint (fake of the Debian layout)

def write_stamp(stamps: Path, relative: str, caption_file: str | None, colour=(200, 30, 30, 255)):
    png = stamps / f"{relative}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGBA", (6, 6), (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (3, 3), colour), (0, 0))
    image.save(png)
    if caption_file is not None:
        (stamps / f"{relative}.txt").write_text(caption_file, encoding="utf-8")


def fake_tuxpaint(root: Path) -> Path:
    """As `dpkg -x tuxpaint-stamps-default_*.deb root` lays it out: English first, then lang.utf8= lines."""
    stamps = root / "usr" / "share" / "tuxpaint" / "stamps"
    write_stamp(stamps, "animals/mammals/bear", "A european bear.\nach.utf8=Lyec.\naf.utf8='n Europese beer.\n"
                "de.utf8=Ein europ\u00e4ischer B\u00e4r.\nen_GB.utf8=A European bear.\n")
    write_stamp(stamps, "food/fruit/apple_fuji", "A \u201cFuji\u201d apple.\nar.utf8=.\u062a\u0641\u0627\u062d\u0629\n")
    write_stamp(stamps, "household/tools/measuring_tape", "A measuring tape.\n")
    write_stamp(stamps, "household/tools/measuring_tape_mirror", None)  # real: mirrors have no .txt
    (stamps / "food" / "cheese.txt").write_text("Some cheese.\n")  # real: a .txt for an .svg stamp
    (stamps / "food" / "cheese.svg").write_text("<svg/>")
    (stamps / "animals" / "mammals" / "bear.dat").write_text("colorable\n")
    return root


def test_tuxpaint_from_a_dpkg_x_tree(tmp_path):
    folder = prepare_dataset("tuxpaint", tmp_path / "out", source=fake_tuxpaint(tmp_path / "deb"))
    images = read_image_set(folder / "captions.json")
    assert [(r.id, r.image, r.captions, r.meta) for r in images.records] == [
        ("animals/mammals/bear", "images/animals/mammals/bear.png", ("A european bear.",), {"category": "animals"}),
        ("food/fruit/apple_fuji", "images/food/fruit/apple_fuji.png", ("A \u201cFuji\u201d apple.",),
         {"category": "food"}),
        ("household/tools/measuring_tape", "images/household/tools/measuring_tape.png", ("A measuring tape.",),
         {"category": "household"}),
    ]
    bear = load_image(folder, images.records[0].image)
    assert bear.getpixel((0, 0)) == (200, 30, 30) and bear.getpixel((5, 5)) == (255, 255, 255)


def test_tuxpaint_limit_and_stamps_folder_as_source(tmp_path):
    stamps = fake_tuxpaint(tmp_path / "deb") / "usr" / "share" / "tuxpaint" / "stamps"
    folder = prepare_dataset("tuxpaint", tmp_path / "out", source=stamps, limit=2)
    assert [r.id for r in read_image_set(folder / "captions.json").records] == [
        "animals/mammals/bear", "food/fruit/apple_fuji"]


def test_failed_build_leaves_nothing_behind(tmp_path):
    stamps = fake_tuxpaint(tmp_path / "deb")
    (stamps / "usr/share/tuxpaint/stamps/food/fruit/apple_fuji.txt").write_bytes(b"\xff\xfe broken")
    with pytest.raises(BlitextError, match=r"apple_fuji\.txt: not UTF-8"):
        prepare_dataset("tuxpaint", tmp_path / "out", source=stamps)
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------- Fashion-MNIST (fake of the Debian layout)

def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX as Debian ships it: gzip of big-endian magic 0x0000 0x08 ndim, uint32 sizes, uint8 data."""
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(root: Path) -> Path:
    folder = root / "usr" / "share" / "datasets" / "fashion-mnist"
    folder.mkdir(parents=True)
    for prefix, labels in (("train", [9, 0, 7]), ("t10k", [8, 3])):
        images = np.stack([np.full((28, 28), 10 * (i + 1), np.uint8) for i in range(len(labels))])
        images[:, 0, 0] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.array(labels))
    return root


def test_fashion_mnist_from_a_dpkg_x_tree(tmp_path):
    folder = prepare_dataset("fashion-mnist", tmp_path / "out", source=fake_fashion_mnist(tmp_path / "deb"))
    train = read_image_set(folder / "captions_train.json")
    assert [(r.id, r.image, r.captions) for r in train.records] == [
        ("train-0", "images/train/0.png", ("a photo of an ankle boot",)),
        ("train-1", "images/train/1.png", ("a photo of a t-shirt",)),
        ("train-2", "images/train/2.png", ("a photo of a sneaker",)),
    ]
    image = load_image(folder, "images/train/2.png")
    assert image.size == (28, 28) and image.getpixel((1, 1)) == (30, 30, 30) and image.getpixel((0, 0)) == (255,) * 3
    vqa = read_vqa(folder / "vqa_test_questions.json", folder / "vqa_test_annotations.json")
    assert [(r.question_id, r.image_id, r.question, r.answers[0], len(r.answers)) for r in vqa] == [
        ("test-0", "test-0", "what is in the picture?", "bag", 10),
        ("test-1", "test-1", "what is in the picture?", "dress", 10)]


def test_fashion_mnist_limit_is_per_split(tmp_path):
    folder = prepare_dataset("fashion-mnist", tmp_path / "out", source=fake_fashion_mnist(tmp_path / "deb"), limit=1)
    counts = json.loads((folder / "prepared.json").read_text())["counts"]
    assert counts == {"train": {"images": 1, "questions": 1}, "test": {"images": 1, "questions": 1}}


def test_fashion_mnist_truncated_idx_is_named(tmp_path):
    root = fake_fashion_mnist(tmp_path / "deb")
    images = root / "usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-10]))
    with pytest.raises(BlitextError, match=r"t10k-images-idx3-ubyte\.gz: header says shape \(2, 28, 28\)"):
        prepare_dataset("fashion-mnist", tmp_path / "out", source=root)


# ---------------------------------------------------------------- missing Debian packages

@pytest.mark.parametrize("name, constant, package", [
    ("tuxpaint", "TUXPAINT_STAMPS", "tuxpaint-stamps-default"),
    ("fashion-mnist", "FASHION_MNIST_DIR", "dataset-fashion-mnist"),
])
@pytest.mark.parametrize("root", [False, True])
def test_missing_package_without_install_names_the_apt_command_and_runs_nothing(tmp_path, monkeypatch, name,
                                                                                constant, package, root):
    ran = []
    monkeypatch.setattr(prepare, constant, tmp_path / "absent")
    monkeypatch.setattr(prepare.os, "geteuid", lambda: 0 if root else 1000)
    monkeypatch.setattr(prepare, "_can_install_packages", lambda: root)
    monkeypatch.setattr(prepare, "_run_apt", lambda command: ran.append(command) or True)
    command = f"{'' if root else 'sudo '}apt-get install --no-install-recommends {package}"
    with pytest.raises(BlitextError, match=re.escape(f"run `{command}`, or pass --install")) as e:
        prepare_dataset(name, tmp_path / "out")
    assert ran == [] and "\n" not in str(e.value)  # even as root, nothing is installed unasked


def test_install_runs_apt_get(tmp_path, monkeypatch):
    stamps = tmp_path / "stamps"
    ran = []

    def fake_apt(command):
        ran.append(command)
        write_stamp(stamps, "animals/bear", "A bear.\n")  # what the real install would put there
        return True

    monkeypatch.setattr(prepare, "TUXPAINT_STAMPS", stamps)
    monkeypatch.setattr(prepare, "_can_install_packages", lambda: True)
    monkeypatch.setattr(prepare, "_run_apt", fake_apt)
    folder = prepare_dataset("tuxpaint", tmp_path / "out", install=True)
    assert ran == [["apt-get", "install", "-y", "--no-install-recommends", "tuxpaint-stamps-default"]]
    assert read_image_set(folder / "captions.json").records[0].captions == ("A bear.",)


def test_install_when_not_root_says_to_run_it_with_sudo(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "TUXPAINT_STAMPS", tmp_path / "absent")
    monkeypatch.setattr(prepare, "_can_install_packages", lambda: False)
    monkeypatch.setattr(prepare, "_run_apt", lambda command: pytest.fail("apt-get must not run"))
    with pytest.raises(BlitextError, match=re.escape("--install needs root and apt-get: run "
                                                     "`sudo apt-get install --no-install-recommends "
                                                     "tuxpaint-stamps-default`")):
        prepare_dataset("tuxpaint", tmp_path / "out", install=True)


def test_data_prepare_cli_installs_only_with_install_flag(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from blitext.cli.main import app

    stamps, ran = tmp_path / "stamps", []

    def fake_apt(command):
        ran.append(command)
        write_stamp(stamps, "animals/bear", "A bear.\n")
        return True

    monkeypatch.setattr(prepare, "TUXPAINT_STAMPS", stamps)
    monkeypatch.setattr(prepare, "_can_install_packages", lambda: True)
    monkeypatch.setattr(prepare, "_run_apt", fake_apt)
    refused = CliRunner().invoke(app, ["data", "prepare", "tuxpaint", "--out-root", str(tmp_path / "out")])
    assert refused.exit_code == 2 and ran == []
    assert "or pass --install" in " ".join(refused.output.split())
    done = CliRunner().invoke(app, ["data", "prepare", "tuxpaint", "--out-root", str(tmp_path / "out"), "--install"])
    assert done.exit_code == 0, done.output
    assert ran == [["apt-get", "install", "-y", "--no-install-recommends", "tuxpaint-stamps-default"]]


def test_bad_source_folder_is_refused(tmp_path):
    with pytest.raises(BlitextError, match="not an easy-VQA data folder"):
        prepare_dataset("easy-vqa", tmp_path / "out", source=tmp_path)
    with pytest.raises(BlitextError, match="no train-images-idx3-ubyte.gz found"):
        prepare_dataset("fashion-mnist", tmp_path / "out", source=tmp_path)
