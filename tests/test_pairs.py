"""read_pairs' compact columns: the pairs ImageRecords gave, at a fraction of the memory
(reader formats and their errors: test_data_readers.py, test_bad_rows.py)."""
import json
import sys

import numpy as np
import pytest

from blitext.data.columns import StringColumn
from blitext.data.pairs import read_pairs
from blitext.data.readers import read_image_set
from blitext.data.text import caption_key
from blitext.errors import BlitextError

WITHOUT_FEATURES = "c"


def pairs_from_records(paths, has_image):
    """What read_pairs held before the columns: lists built from read_image_set's records."""
    keys, image_ids, texts, refs = [], [], [], {}
    for path in paths:
        image_set = read_image_set(path)
        for rec in image_set.records:
            for k, caption in enumerate(rec.captions):
                if has_image(rec.id):
                    keys.append(caption_key(rec.id, k))
                    image_ids.append(rec.id)
                    texts.append(caption)
                    refs[rec.id] = (image_set.root, rec.image)
    return keys, image_ids, texts, refs


def caption_files(tmp_path):
    """A COCO file whose annotations interleave images, with blanks, a row without a caption and
    an image without features; a jsonl file repeating one of its ids (files group on their own)."""
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"img/{i}.jpg"} for i in ("a", "b", "c", "d")],
        "annotations": [{"image_id": "b", "caption": "b one"}, {"image_id": "a", "caption": " a one "},
                        {"image_id": "c", "caption": "c one"}, {"image_id": "b", "caption": "  "},
                        {"image_id": "a", "caption": "a two \u2014 caf\u00e9"}, {"image_id": "b", "caption": "b two"},
                        {"image_id": "a"}, {"image_id": "c", "caption": "c two"}]}))
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "captions.jsonl").write_text(
        '{"image": "x.png", "caption": "x one", "id": "x"}\n{"image": "a2.png", "caption": ["", "a again"], "id": "a"}\n'
        '{"image": "x.png", "caption": "x two", "id": "x"}\n')
    return [coco, tmp_path / "more" / "captions.jsonl"]


def test_columns_give_the_pairs_the_records_gave(tmp_path):
    paths = caption_files(tmp_path)
    has_image = lambda image_id: image_id != WITHOUT_FEATURES  # noqa: E731
    pairs = read_pairs([str(p) for p in paths], None, has_image)
    keys, image_ids, texts, refs = pairs_from_records(paths, has_image)
    assert keys == ["a#0", "a#1", "b#0", "b#1", "x#0", "x#1", "a#0"]  # the fixture is what it says
    assert list(pairs.keys) == keys and list(pairs.image_ids) == image_ids and list(pairs.texts) == texts
    assert pairs.texts == texts and [pairs.keys[i] for i in range(len(keys))] == keys
    assert pairs.keys[-1] == "a#0" and pairs.texts[1:3] == texts[1:3] and pairs.image_ids[::2] == image_ids[::2]
    assert (pairs.skipped, pairs.blank, pairs.no_caption) == (2, 2, 1)
    assert {i: pairs.image_refs[i] for i in refs} == refs  # "a": the later file's image, as the dict had it
    assert WITHOUT_FEATURES not in pairs.image_refs and "d" not in pairs.image_refs  # no pairs: not for --online


def test_an_id_on_two_images_is_the_readers_error_naming_both_rows(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"image": "x.jpg", "caption": "c", "image_id": 5},
                                {"image": "y.jpg", "caption": "d", "image_id": 5}]))
    with pytest.raises(BlitextError, match=r"id '5' names two different images: 'x\.jpg' .*entry 0.* 'y\.jpg' .*entry 1"):
        read_pairs([str(path)], None, lambda image_id: True)


def test_columns_hold_a_caption_in_its_bytes_not_in_python_objects(tmp_path):
    """Lists of str cost ~60 bytes of object and pointer per string besides the text (about
    1 KB per caption with the records behind them): the columns hold the UTF-8 bytes and a few
    array entries, and the reader keeps no list of them."""
    n = 2000
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps({"image": f"img/{i:06d}.jpg", "caption": f"photo {i:06d}", "id": f"{i:06d}"}) + "\n"
                            for i in range(n)))
    pairs = read_pairs([str(path)], None, lambda image_id: True)
    assert isinstance(pairs.texts, StringColumn) and isinstance(pairs.texts.offsets, np.ndarray)
    as_lists = sum(sys.getsizeof(s) + 8 for column in (pairs.keys, pairs.image_ids, pairs.texts) for s in column)
    text_bytes = sum(len(s) for column in (pairs.image_ids, pairs.texts) for s in column) + len("img/000000.jpg") * n
    # beyond the text: three int64 offsets (text, id, reference), an int32 image number, a 1-byte k
    assert pairs.nbytes() < text_bytes + 30 * n < as_lists
    assert not any(isinstance(v, list) for v in vars(pairs).values())
