"""train-adapter's group numbers (Pairs.groups(): which pairs of a batch match, same image id or
same caption text): stored once beside read_pairs' columns and mapped by every process, equal to
the numbers first_copy_of gives; computed on demand where the pairs are in memory."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

import blitext.data.pairs as pairs_module
from blitext.adapter.image import AdapterLoop
from blitext.data import pair_store
from blitext.data.pairs import read_pairs
from blitext.data.text import first_copy_of
from test_pair_store import HAS_IMAGE, formats, no_parse, parses  # noqa: F401  (parses: a fixture)


def with_repeats(tmp_path) -> list[str]:
    """test_pairs' mixed files (id "a" in the COCO file and again in the jsonl, each file numbering
    its images on its own) and a third file repeating captions, within an image and across files."""
    files = formats(tmp_path)["mixed"]
    more = tmp_path / "repeats.jsonl"
    more.write_text("".join(json.dumps(row) + "\n" for row in [
        {"image": "y.png", "id": "y", "caption": ["b one", "y one", "y one"]},
        {"image": "x.png", "id": "x", "caption": "a again"}]))
    return [*files, str(more)]


def expected_groups(pairs) -> tuple[np.ndarray, np.ndarray]:
    return first_copy_of(list(pairs.image_ids)), first_copy_of(list(pairs.texts))


def test_stored_groups_are_first_copy_of_the_ids_and_texts(tmp_path):
    files = with_repeats(tmp_path)
    stored = read_pairs(files, None, HAS_IMAGE, accepts="test")
    image_group, text_group = stored.groups()
    assert isinstance(image_group, np.memmap) and not text_group.flags.writeable  # mapped, not computed
    assert image_group.dtype == text_group.dtype == np.int32
    for got, want in zip(stored.groups(), expected_groups(stored)):
        np.testing.assert_array_equal(got, want)
    ids, numbers = list(stored.image_ids), np.asarray(stored.image_ids.index)
    a = [i for i, image_id in enumerate(ids) if image_id == "a"]
    assert len(set(numbers[a])) == 2 and len(set(image_group[a])) == 1  # one id, two files: one group
    assert len(set(text_group.tolist())) < len(text_group)  # the fixture repeats captions


def test_a_mapping_process_does_not_compute_them(tmp_path, monkeypatch, parses):  # noqa: F811
    files = with_repeats(tmp_path)
    first = [np.array(g) for g in read_pairs(files, None, HAS_IMAGE, accepts="test").groups()]
    no_parse(monkeypatch)
    monkeypatch.setattr(pairs_module, "first_copy_of", lambda values: pytest.fail("the group numbers were computed"))
    again = read_pairs(files, None, HAS_IMAGE, accepts="test").groups()
    for got, want in zip(again, first):
        np.testing.assert_array_equal(got, want)


def test_a_folder_of_the_format_before_the_groups_is_rebuilt(tmp_path, parses):  # noqa: F811
    """Format 1 had no group files. Its folders hash to another name (the format is in the
    fingerprint); one found under this name (its marker rewritten here) is rebuilt, not opened."""
    files = with_repeats(tmp_path)
    folder = read_pairs(files, None, HAS_IMAGE, accepts="test").store
    marker = json.loads((folder / pair_store.MARKER).read_text())
    for name in pair_store.GROUPS:
        (folder / f"{name}.npy").unlink()
        del marker["bytes"][f"{name}.npy"]
    (folder / pair_store.MARKER).write_text(json.dumps({**marker, "format": "blitext-pairs/1"}))
    assert "format is 'blitext-pairs/1'" in pair_store.problem(folder)
    again = read_pairs(files, None, HAS_IMAGE, accepts="test")
    assert len(parses) == 2 and pair_store.problem(folder) is None and again.store == folder
    for got, want in zip(again.groups(), expected_groups(again)):
        np.testing.assert_array_equal(got, want)


def test_an_unwritable_cache_root_computes_equal_groups(tmp_path, monkeypatch):
    files = with_repeats(tmp_path)
    stored = [np.array(g) for g in read_pairs(files, None, HAS_IMAGE, accepts="test").groups()]
    (tmp_path / "not a folder").write_text("")
    monkeypatch.setenv("BLITEXT_CACHE", str(tmp_path / "not a folder"))
    memory = read_pairs(files, None, HAS_IMAGE, accepts="test")
    assert memory.store is None and memory.group_numbers is None  # computed on first use
    for got, want, first_copies in zip(memory.groups(), stored, expected_groups(memory)):
        assert got.dtype == np.int32 and not isinstance(got, np.memmap)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, first_copies)
    lists = pairs_module.Pairs(list(memory.keys), list(memory.image_ids), list(memory.texts), {})  # a bench's lists
    for got, want in zip(lists.groups(), stored):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("accepts", [None, "test"])
def test_batch_matches_are_same_image_id_or_same_text(tmp_path, accepts):
    """AdapterLoop.positives reads the batch's numbers from the (mapped) groups: pair j of the
    global batch matches local pair i exactly where their image ids or their texts are equal."""
    pairs = read_pairs(with_repeats(tmp_path), None, HAS_IMAGE, accepts=accepts)
    ids, texts = list(pairs.image_ids), list(pairs.texts)
    index = [len(ids) - 1 - i for i in range(len(ids))] + [0, 3]  # every pair, reversed, and two again
    rows = [1, 2, 4, len(index) - 1]
    positive = AdapterLoop.positives(SimpleNamespace(groups=pairs.groups()), index, rows)
    want = [[ids[index[r]] == ids[j] or texts[index[r]] == texts[j] for j in index] for r in rows]
    assert positive.tolist() == want and sum(map(sum, want)) > 2 * len(rows)  # matches beyond itself
