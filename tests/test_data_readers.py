"""Caption dataset readers: every caption format, path safety, and the caption writer's round trip (VQA: test_vqa_readers.py)."""
import csv
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from blitext.data.images import read_image_bytes
from blitext.data.readers import read_image_set, write_lavis_json
from blitext.data.records import ImageRecord
from blitext.errors import BlitextError


def png_bytes(colour=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buf, "PNG")
    return buf.getvalue()


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                add_member(tar, f"{key}.{ext}", data)
    return path


# ---------------------------------------------------------------- caption JSON

def test_lavis_list_groups_captions_by_image_id_in_file_order(tmp_path):
    path = write_json(tmp_path / "ann.json", [
        {"image": "val/b.jpg", "caption": "a dog", "image_id": "coco_2"},
        {"image": "val/a.jpg", "caption": "a cat", "image_id": 1},
        {"image": "val/b.jpg", "caption": " a brown dog \n", "image_id": "coco_2"},
    ])
    images = read_image_set(path)
    assert images.root == tmp_path and images.source == str(path)
    assert [(r.id, r.image, r.captions) for r in images.records] == [
        ("coco_2", "val/b.jpg", ("a dog", "a brown dog")),
        ("1", "val/a.jpg", ("a cat",)),
    ]


def test_lavis_list_without_ids_groups_by_path_and_reads_caption_lists(tmp_path):
    path = write_json(tmp_path / "test.json", [
        {"image": "./imgs/x.png", "caption": ["one", "two"], "split": "test"},
        {"image": "imgs/x.png", "caption": "three"},
        {"image": "imgs/y.png", "caption": []},
    ])
    records = read_image_set(path, image_root=tmp_path / "elsewhere").records
    assert [(r.id, r.image, r.captions) for r in records] == [
        ("imgs/x", "imgs/x.png", ("one", "two", "three")), ("imgs/y", "imgs/y.png", ())]
    assert records[0].meta == {"split": "test"}
    assert read_image_set(path, image_root=tmp_path / "elsewhere").root == tmp_path / "elsewhere"


def test_official_coco_captions(tmp_path):
    path = write_json(tmp_path / "captions_val2014.json", {
        "info": {}, "images": [{"id": 42, "file_name": "COCO_42.jpg"}, {"id": 7, "file_name": "COCO_7.jpg"}],
        "annotations": [{"id": 1, "image_id": 7, "caption": "a bus"}, {"id": 2, "image_id": 42, "caption": "a tree"},
                        {"id": 3, "image_id": 7, "caption": "a red bus"}],
    })
    records = read_image_set(path).records
    assert [(r.id, r.image, r.captions) for r in records] == [
        ("42", "COCO_42.jpg", ("a tree",)), ("7", "COCO_7.jpg", ("a bus", "a red bus"))]


def test_coco_annotation_for_unknown_image_is_refused(tmp_path):
    path = write_json(tmp_path / "c.json", {"images": [{"id": 1, "file_name": "a.jpg"}],
                                            "annotations": [{"image_id": 9, "caption": "x"}]})
    with pytest.raises(BlitextError, match=r"c\.json annotations\[0\].*'9'"):
        read_image_set(path)


def test_malformed_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"image": "a.jpg",\n "caption": }]')
    with pytest.raises(BlitextError, match=r"broken\.json: not valid JSON \(line 2"):
        read_image_set(path)


def test_json_of_unknown_shape_is_refused(tmp_path):
    with pytest.raises(BlitextError, match="neither a LAVIS caption list"):
        read_image_set(write_json(tmp_path / "x.json", {"foo": 1}))


def test_blank_captions_are_counted_in_every_format(tmp_path):
    lavis = write_json(tmp_path / "lavis.json", [{"image": "a.png", "caption": ["a cat", "  "]},
                                                 {"image": "b.png", "caption": ""}])
    coco = write_json(tmp_path / "coco.json", {"images": [{"id": 1, "file_name": "a.png"}],
                                               "annotations": [{"image_id": 1, "caption": " \n"},
                                                               {"image_id": 1, "caption": "a cat"}]})
    vatex = write_json(tmp_path / "vatex.json", [{"videoID": "v1", "enCap": ["a dog runs", ""], "chCap": []}])
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "captions.jsonl").write_text('{"image": "a.png", "caption": "\\t"}\n')
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "captions.csv").write_text("image,caption\na.png, \nb.png,a dog\n")
    shard = make_shard(tmp_path / "s" / "0.tar", [("0", {"png": png_bytes(), "txt": b" \n"}),
                                                  ("1", {"png": png_bytes()})])  # no .txt: no caption, not blank
    counts = {p.name: read_image_set(p).blank_captions
              for p in (lavis, coco, vatex, tmp_path / "j", tmp_path / "c", shard)}
    assert counts == {"lavis.json": 2, "coco.json": 1, "vatex.json": 1, "j": 1, "c": 1, "0.tar": 1}
    assert read_image_set(lavis).records[0].captions == ("a cat",)  # keys <id>#k count kept captions, as before


def test_rows_without_a_caption_are_counted_in_every_format(tmp_path):
    """A caption row with no caption (key absent or null) adds no pair: counted, not dropped unseen.
    COCO's "images" and a plain image folder name images without captions by design: not counted."""
    lavis = write_json(tmp_path / "lavis.json", [{"image": "a.png", "caption": "a cat"}, {"image": "b.png"},
                                                 {"image": "c.png", "caption": None}])
    coco = write_json(tmp_path / "coco.json", {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
                                               "annotations": [{"image_id": 1}, {"image_id": 1, "caption": "a cat"}]})
    vatex = write_json(tmp_path / "vatex.json", [{"videoID": "v1", "enCap": ["a dog runs"]}, {"videoID": "v2"}])
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "captions.jsonl").write_text('{"image": "a.png"}\n{"image": "b.png", "caption": "a dog"}\n')
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "captions.csv").write_text("image,caption\na.png,\nb.png,a dog\n")  # an empty field is blank
    shard = make_shard(tmp_path / "s" / "0.tar", [("0", {"png": png_bytes(), "txt": b"a cat"}),
                                                  ("1", {"png": png_bytes()})])
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.png").write_bytes(png_bytes())
    counts = {p.name: read_image_set(p).no_caption_rows
              for p in (lavis, coco, vatex, tmp_path / "j", tmp_path / "c", shard, tmp_path / "f")}
    assert counts == {"lavis.json": 2, "coco.json": 1, "vatex.json": 1, "j": 1, "c": 0, "0.tar": 1, "f": 0}


def test_blank_captions_are_reported_once_by_the_callers(tmp_path, monkeypatch):
    from blitext.data import pairs
    from blitext.data.text import read_sentences

    first = write_json(tmp_path / "a.json", [{"image": "a.png", "caption": ["a cat", " ", ""]}])
    second = write_json(tmp_path / "b.json", [{"image": "b.png", "caption": ["", "a dog"]}])
    said = []
    monkeypatch.setattr(pairs, "say", said.append)
    read = pairs.read_pairs([str(first), str(second)], None, lambda image_id: True)
    assert read.texts == ["a cat", "a dog"] and read.blank == 3
    assert said == [f"3 blank captions skipped in {first}, {second}"]
    assert read_sentences([str(first), str(second)]).counts["empty skipped"] == 3  # train-pformer prints it


# ---------------------------------------------------------------- folders

def test_jsonl_folder_with_and_without_ids(tmp_path):
    (tmp_path / "captions.jsonl").write_text(
        '{"image": "a.png", "caption": "first", "id": "img-a"}\n\n'
        '{"image": "sub/b.png", "caption": "second"}\n'
        '{"image": "a.png", "caption": "again", "id": "img-a", "source": "web"}\n')
    images = read_image_set(tmp_path)
    assert images.root == tmp_path
    assert [(r.id, r.image, r.captions) for r in images.records] == [
        ("img-a", "a.png", ("first", "again")), ("sub/b", "sub/b.png", ("second",))]


def test_malformed_jsonl_line_is_named(tmp_path):
    (tmp_path / "captions.jsonl").write_text('{"image": "a.png", "caption": "ok"}\n{"image": oops}\n')
    with pytest.raises(BlitextError, match=r"captions\.jsonl line 2: not valid JSON"):
        read_image_set(tmp_path)


@pytest.mark.parametrize("name, lines", [
    ("captions.jsonl", ['{"image": "a.png", "caption": "one"}', '{"image": "b.png", "caption": "two"}',
                        '{"image": "c.png", "caption": "caf\u00e9"}']),
    ("captions.csv", ["image,caption", "a.png,one", "c.png,caf\u00e9"]),
    ("ann.json", ['[{"image": "a.png", "caption": "one"},', '{"image": "b.png", "caption": "two"},',
                  '{"image": "c.png", "caption": "caf\u00e9"}]']),
])
def test_caption_file_not_utf8_names_line_and_byte(tmp_path, name, lines):
    text = "\n".join(lines) + "\n"
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))  # \u00e9 -> the lone byte 0xe9
    offset = text.encode("latin-1").index(b"\xe9")
    with pytest.raises(BlitextError) as e:
        read_image_set(path if name.endswith(".json") else tmp_path)
    line = len(lines)
    assert f"{path} line {line} (byte offset {offset}): byte 0xe9 is not UTF-8" in str(e.value)
    assert "re-save" in str(e.value) and "UTF-8" in str(e.value)


def test_csv_folder_with_quoted_commas_and_optional_id(tmp_path):
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "id"])
        writer.writerow(["p/1.jpg", "a cat, asleep", ""])
        writer.writerow(["p/2.jpg", "a dog", "dog-2"])
        writer.writerow(["p/1.jpg", "a sleeping cat", ""])
    records = read_image_set(tmp_path).records
    assert [(r.id, r.image, r.captions) for r in records] == [
        ("p/1", "p/1.jpg", ("a cat, asleep", "a sleeping cat")), ("dog-2", "p/2.jpg", ("a dog",))]


def test_csv_without_required_columns_or_with_ragged_rows_is_refused(tmp_path):
    (tmp_path / "captions.csv").write_text("file,text\na.jpg,hello\n")
    with pytest.raises(BlitextError, match=r"captions\.csv line 1: the header must name the columns image,caption"):
        read_image_set(tmp_path)
    (tmp_path / "captions.csv").write_text("image,caption\na.jpg,hello\nb.jpg,one,two\n")
    with pytest.raises(BlitextError, match=r"captions\.csv line 3: has a different number of fields"):
        read_image_set(tmp_path)


def test_plain_image_folder_lists_images_sorted_with_path_ids(tmp_path):
    for name in ["b.png", "a/c.JPG", "a/d.webp", "notes.txt", ".hidden/e.png", "z.tiff"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    records = read_image_set(tmp_path).records
    assert [(r.id, r.image, r.captions) for r in records] == [
        ("a/c", "a/c.JPG", ()), ("a/d", "a/d.webp", ()), ("b", "b.png", ()), ("z", "z.tiff", ())]
    assert read_image_set(tmp_path).records == records  # stable across runs


def test_plain_folder_images_sharing_a_stem_keep_their_extension_in_the_id(tmp_path):
    # x.jpg and x.png both had the id "x": the folder could not be read, and a folder has no ids to fix.
    for name in ["x.jpg", "x.png", "y.png", "sub/x.gif", "x.jpg.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    records = read_image_set(tmp_path).records
    # only the colliding files change; "x.jpg.png" (stem "x.jpg") then collides with x.jpg's new id
    assert [(r.id, r.image) for r in records] == [
        ("sub/x", "sub/x.gif"), ("x.jpg", "x.jpg"), ("x.jpg.png", "x.jpg.png"), ("x.png", "x.png"), ("y", "y.png")]


def test_empty_folder_and_unknown_file_are_refused_with_the_accepted_formats(tmp_path):
    with pytest.raises(BlitextError, match="found no captions.jsonl.*expected one of"):
        read_image_set(tmp_path)
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(BlitextError, match=r"data\.parquet: unsupported dataset format '\.parquet'.*webdataset"):
        read_image_set(tmp_path / "data.parquet")
    with pytest.raises(BlitextError, match="does not exist"):
        read_image_set(tmp_path / "nope.json")


# ---------------------------------------------------------------- webdataset shards

SAMPLES_0 = [
    ("000000000", {"jpg": b"jpeg-0", "txt": b"a red bus\n", "json": b'{"key": "000000000", "caption": "x"}'}),
    ("000000001", {"png": png_bytes(), "json": json.dumps({"caption": "a red square", "key": "k1"}).encode()}),
    ("000000002", {"txt": b"caption without an image"}),
]
SAMPLES_1 = [("000010000", {"webp": b"webp-bytes", "txt": "un caf\u00e9".encode()})]


def test_single_tar_shard(tmp_path):
    shard = make_shard(tmp_path / "shard-00000.tar", SAMPLES_0)
    images = read_image_set(shard)
    assert images.root == tmp_path
    assert [(r.id, r.image, r.captions) for r in images.records] == [
        ("000000000", "shard-00000.tar#000000000.jpg", ("a red bus",)),
        ("k1", "shard-00000.tar#000000001.png", ("a red square",)),
    ]
    assert read_image_bytes(images.root, images.records[1].image) == png_bytes()


def test_glob_and_folder_of_tar_shards_give_the_same_records(tmp_path):
    make_shard(tmp_path / "shards" / "s-00000.tar", SAMPLES_0)
    make_shard(tmp_path / "shards" / "s-00001.tar", SAMPLES_1)
    by_glob = read_image_set(f"{tmp_path}/shards/*.tar")
    by_folder = read_image_set(tmp_path / "shards")
    assert by_glob.root == by_folder.root == tmp_path / "shards"
    assert by_glob.records == by_folder.records
    assert [r.id for r in by_glob.records] == ["000000000", "k1", "000010000"]
    assert by_glob.records[2] == ImageRecord("000010000", "s-00001.tar#000010000.webp", ("un caf\u00e9",))
    assert read_image_bytes(by_glob.root, by_glob.records[2].image) == b"webp-bytes"


def test_glob_matching_nothing_is_refused(tmp_path):
    with pytest.raises(BlitextError, match="matches no files"):
        read_image_set(f"{tmp_path}/none-*.tar")


# ---------------------------------------------------------------- path safety and ids

@pytest.mark.parametrize("bad", ["../secret.png", "imgs/../../secret.png", "/etc/passwd", "../x.tar#0.jpg"])
def test_paths_leaving_the_root_are_refused_naming_file_and_row(tmp_path, bad):
    path = write_json(tmp_path / "ann.json", [{"image": "ok.png", "caption": "fine"}, {"image": bad, "caption": "x"}])
    with pytest.raises(BlitextError, match=rf"ann\.json entry 1: image path '{bad}'"):
        read_image_set(path)


def test_symlink_out_of_the_root_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes())
    root = tmp_path / "data"
    root.mkdir()
    os.symlink(outside, root / "linked")
    (root / "captions.jsonl").write_text('{"image": "linked/secret.png", "caption": "x"}\n')
    with pytest.raises(BlitextError, match=r"captions\.jsonl line 1: image path 'linked/secret\.png' is a symlink"):
        read_image_set(root)


def test_a_file_symlink_out_of_the_root_is_refused_and_links_inside_it_are_read(tmp_path):
    (tmp_path / "secret.png").write_bytes(png_bytes())
    root = tmp_path / "data"
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "a.png").write_bytes(png_bytes())
    os.symlink(root / "imgs" / "a.png", root / "imgs" / "b.png")  # inside the root: fine
    os.symlink(root / "imgs", root / "same")
    ok = write_json(root / "ok.json", [{"image": "imgs/b.png", "caption": "x"}, {"image": "same/a.png", "caption": "y"}])
    assert [r.image for r in read_image_set(ok).records] == ["imgs/b.png", "same/a.png"]
    os.symlink(tmp_path / "secret.png", root / "imgs" / "evil.png")
    bad = write_json(root / "bad.json", [{"image": "imgs/a.png", "caption": "x"}, {"image": "imgs/evil.png", "caption": "y"}])
    with pytest.raises(BlitextError, match=r"bad\.json entry 1: image path 'imgs/evil\.png' is a symlink"):
        read_image_set(bad)


def test_a_folder_is_resolved_once_however_many_images_it_holds(tmp_path, monkeypatch):
    """Resolving each reference (a system call per path component) made the cost per caption grow with size."""
    import blitext.data.parsing as parsing

    calls = []
    real = os.path.realpath
    monkeypatch.setattr(parsing.os.path, "realpath", lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    path = write_json(tmp_path / "ann.json", [{"image": f"imgs/{i}.png", "caption": "c"} for i in range(50)])
    assert len(read_image_set(path).records) == 50
    assert len(calls) == 2  # the root and imgs/


def test_references_in_known_folders_are_normalised_and_checked_as_whole_ones(tmp_path):
    rows = [{"image": image, "caption": "c", "image_id": i} for i, image in
            enumerate(["imgs/a.png", "imgs/./b.png", "./imgs/c.png", "imgs//d.png", "top.png", "./e.png"])]
    got = [r.image for r in read_image_set(write_json(tmp_path / "ann.json", rows)).records]
    assert got == ["imgs/a.png", "imgs/b.png", "imgs/c.png", "imgs/d.png", "top.png", "e.png"]
    for bad in ("C:x.png", "/top.png", "imgs/../../x.png"):  # after top.png and imgs/ were found inside the root
        path = write_json(tmp_path / "bad.json", [{"image": "top.png", "caption": "c"}, {"image": "imgs/a.png", "caption": "c"},
                                                 {"image": bad, "caption": "c"}])
        with pytest.raises(BlitextError, match=r"bad\.json entry 2: image path"):
            read_image_set(path)


def test_one_id_on_two_images_is_refused_naming_both(tmp_path):
    path = write_json(tmp_path / "a.json", [{"image": "x.jpg", "caption": "c", "image_id": 5},
                                            {"image": "y.jpg", "caption": "d", "image_id": 5}])
    both = r"id '5' names two different images: 'x\.jpg' .*entry 0.* 'y\.jpg' .*entry 1"
    with pytest.raises(BlitextError, match=both):
        read_image_set(path)


# ---------------------------------------------------------------- writers

def test_lavis_writer_round_trips_through_the_reader(tmp_path):
    records = [ImageRecord("train-3", "images/train/3.png", ("a blue circle",), {"category": "shapes"}),
               ImageRecord("train-4", "images/train/4.png", ("a red square", "a red box")),
               ImageRecord("t\u00fcx", "images/t\u00fcx.png", ("Tux\u2014the mascot!",))]
    write_lavis_json(tmp_path / "out" / "captions.json", records)
    back = read_image_set(tmp_path / "out" / "captions.json").records
    assert back == records
    assert [r.meta for r in back] == [r.meta for r in records]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left
