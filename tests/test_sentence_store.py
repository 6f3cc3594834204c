"""train-pformer's stored sentences and split (sentence_store.py): read and split once into files
under the cache root, memory-mapped by every process, equal to the in-memory split, rebuilt when
an input changes or a writer was killed, shared by torchrun's ranks."""
import json
import mmap

import numpy as np
import pytest

import blitext.pformer.train as train_module
from blitext.data import column_store, sentence_store
from blitext.data.text import read_sentences
from blitext.errors import BlitextError
from blitext.pformer.train import read_split, split_corpus
from test_pair_store import half_write, rank_script, two_ranks_twice

HELDOUT = 3


def text_files(tmp_path) -> list[str]:
    """Plain text with repeats and empty lines, a JSONL and a caption JSON: every kind read_sentences reads."""
    words = ["a dog", "caf\u00e9 au lait", "a cat", "", "a dog", "two birds", "  ", "a red car", "a cat", "\U0001f642 ok"]
    (tmp_path / "plain.txt").write_text("".join(f"{w}\n" for w in words * 3))
    (tmp_path / "lines.jsonl").write_text("".join(json.dumps({"text": w}) + "\n" for w in words if w.strip()))
    (tmp_path / "captions.json").write_text(json.dumps([{"image": f"{i}.jpg", "image_id": str(i), "caption": w}
                                                        for i, w in enumerate(words)]))
    return [str(tmp_path / name) for name in ("plain.txt", "lines.jsonl", "captions.json")]


def as_lists(split) -> dict:
    return {"train_ids": list(split.train_ids), "train": list(split.train), "heldout": list(split.heldout),
            "counts": dict(split.counts)}


def in_memory(files, seed=0) -> dict:
    return as_lists(split_corpus(read_sentences(files), HELDOUT, seed))


@pytest.fixture
def parses(monkeypatch) -> list:
    """Counts the text files' reads: one entry per read."""
    calls, real = [], train_module.read_sentences
    monkeypatch.setattr(train_module, "read_sentences", lambda *a: (calls.append(a[0]), real(*a))[1])
    return calls


@pytest.mark.parametrize("seed", range(3))
def test_the_mapped_split_equals_the_in_memory_one(tmp_path, cache_root, seed):
    files = text_files(tmp_path)
    stored = read_split(files, "error", HELDOUT, seed)
    assert stored.store.parent == cache_root / "sentences"
    assert isinstance(stored.train.values.blob, mmap.mmap) and not stored.train.index.flags.writeable  # mapped
    assert as_lists(stored) == in_memory(files, seed)
    assert len(stored.train) > 10 and stored.counts["empty skipped"] > 0


def test_a_second_run_maps_the_files_without_reading_the_text(tmp_path, monkeypatch, parses, capsys):
    files = text_files(tmp_path)
    first = read_split(files, "error", HELDOUT, 0)
    assert len(parses) == 1
    built = first.store.stat().st_mtime_ns
    monkeypatch.setattr(train_module, "read_sentences", lambda *a: pytest.fail("the text files were read again"))
    again = read_split(files, "error", HELDOUT, 0)
    assert as_lists(again) == as_lists(first) and again.store == first.store
    assert first.store.stat().st_mtime_ns == built
    assert "reused from" in capsys.readouterr().err


def test_a_changed_input_is_a_new_folder(tmp_path, parses):
    files = text_files(tmp_path)
    first = read_split(files, "error", HELDOUT, 0)
    with open(files[0], "a") as f:
        f.write("a new sentence\n")
    changed = read_split(files, "error", HELDOUT, 0)
    assert len(parses) == 2 and changed.store != first.store
    assert as_lists(changed) == in_memory(files) and "a new sentence" in list(changed.train) + changed.heldout
    other_seed = read_split(files, "error", HELDOUT, 1)
    other_heldout = read_split(files, "error", HELDOUT + 1, 1)
    assert len(parses) == 4 and len({s.store for s in (first, changed, other_seed, other_heldout)}) == 4


@pytest.mark.parametrize("damage", ["no marker", "truncated", "killed writer"])
def test_a_half_written_folder_is_rebuilt(tmp_path, parses, damage):
    files = text_files(tmp_path)
    first = read_split(files, "error", HELDOUT, 0)
    folder, expected = first.store, as_lists(first)
    del first
    half_write(folder, sentence_store.MARKER, "sentences.bin", damage)  # a dead writer's folder keeps its marker
    again = read_split(files, "error", HELDOUT, 0)
    assert len(parses) == 2 and as_lists(again) == expected
    assert column_store.problem(sentence_store.STORE, folder) is None
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # the dead writer's folder is gone


@pytest.mark.parametrize("name", ["train.npy", "ids.npy"])
def test_damaged_contents_are_one_line_naming_the_folder(tmp_path, name):
    files = text_files(tmp_path)
    folder = read_split(files, "error", HELDOUT, 0).store
    path = folder / name
    path.write_bytes(b"\0" * path.stat().st_size)  # same size, not a .npy file
    with pytest.raises(BlitextError, match=rf"{folder}.*damaged.*{name}.*delete that folder") as caught:
        read_split(files, "error", HELDOUT, 0)
    assert "\n" not in str(caught.value)


def test_a_training_index_of_another_length_is_one_line(tmp_path):
    files = text_files(tmp_path)
    folder = read_split(files, "error", HELDOUT, 0).store
    path, size = folder / "train.npy", (folder / "train.npy").stat().st_size
    np.save(path, np.load(path).astype(np.int32).repeat(2))  # twice the rows in the same bytes
    assert path.stat().st_size == size
    with pytest.raises(BlitextError, match=rf"{folder}.*damaged.*train.npy does not hold"):
        read_split(files, "error", HELDOUT, 0)


def test_an_unwritable_cache_root_keeps_the_split_in_memory(tmp_path, monkeypatch, capsys):
    files = text_files(tmp_path)
    (tmp_path / "not a folder").write_text("")
    monkeypatch.setenv("BLITEXT_CACHE", str(tmp_path / "not a folder"))
    split = read_split(files, "error", HELDOUT, 0)
    assert split.store is None and as_lists(split) == in_memory(files)
    said = [line for line in capsys.readouterr().err.splitlines() if "kept in this process's memory" in line]
    assert len(said) == 1


READ_SPLIT = """split = patched.read_split(sys.argv[2:], "error", 3, 0)
seen = {"train_ids": list(split.train_ids), "train": list(split.train), "heldout": split.heldout,
        "counts": dict(split.counts), "store": str(split.store), "mapped": type(split.train.values.blob).__name__}"""


def test_torchrun_two_ranks_one_read(tmp_path):
    files = text_files(tmp_path)
    runs = two_ranks_twice(tmp_path, rank_script("blitext.pformer.train", "read_sentences", READ_SPLIT), files)
    assert [parsed for parsed, _ in runs] == [["0"], []]  # rank 0 read once; the second run none
    for _, seen in runs:
        assert seen[0] == seen[1] and seen[0]["mapped"] == "mmap"
        assert {k: seen[0][k] for k in ("train_ids", "train", "heldout", "counts")} == in_memory(files)
