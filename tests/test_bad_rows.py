"""Issue 22: every bad row of a caption file is reported in one pass, then the run stops (it took
four runs to find four bad rows)."""
from __future__ import annotations

import json

import pytest

from blitext.data.readers import read_image_set
from blitext.errors import BlitextError

ROWS = [
    {"image": "a.png", "caption": "fine", "id": "a"},
    {"image": "../secret.png", "caption": "leaves the root", "id": "b"},
    {"image": "c.png", "caption": 7, "id": "c"},
    {"image": "d.png", "caption": "fine", "id": "a"},  # id a again, another image
    {"image": "e.png", "caption": "fine", "id": "e"},
]


def test_every_bad_jsonl_row_is_reported_in_one_pass(tmp_path, capsys):
    lines = [json.dumps(r) for r in ROWS]
    lines.insert(3, '{"image": "broken.png", "caption": ')  # line 4: invalid JSON
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(BlitextError) as e:
        read_image_set(tmp_path)
    text = str(e.value)
    assert "4 rows" in text and "line 2" in text and "\n" not in text
    listed = " ".join(capsys.readouterr().err.split())
    for where in ("line 2:", "line 3:", "line 4:", "'a' names two different images"):
        assert where in listed, (where, listed)


def test_every_bad_lavis_entry_is_reported_in_one_pass(tmp_path, capsys):
    entries = [{"image": r["image"], "caption": r["caption"], "image_id": r["id"]} for r in ROWS]
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    with pytest.raises(BlitextError, match="3 rows"):
        read_image_set(tmp_path / "ann.json")
    listed = " ".join(capsys.readouterr().err.split())
    assert "entry 1:" in listed and "entry 2:" in listed and "names two different images" in listed


def test_one_bad_row_is_its_own_line(tmp_path):
    (tmp_path / "ann.json").write_text(json.dumps([{"image": "../x.png", "caption": "c"}]))
    with pytest.raises(BlitextError, match=r"entry 0: image path '\.\./x\.png' leaves"):
        read_image_set(tmp_path / "ann.json")
