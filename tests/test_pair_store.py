"""read_pairs' stored columns (pair_store.py): parsed once into files under the cache root,
memory-mapped by every process, equal to the in-memory columns, rebuilt when an input changes or
a writer was killed, shared by torchrun's ranks."""
import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

import blitext.data.pairs as pairs_module
from blitext.data import pair_store
from blitext.data.pairs import read_pairs
from blitext.errors import BlitextError
from test_pairs import WITHOUT_FEATURES, caption_files

BIN = Path(sys.executable).parent
HAS_IMAGE = lambda image_id: image_id != WITHOUT_FEATURES  # noqa: E731


def as_lists(pairs) -> dict:
    return {"keys": list(pairs.keys), "image_ids": list(pairs.image_ids), "texts": list(pairs.texts),
            "refs": {i: [str(r[0]), r[1]] for i, r in pairs.image_refs.items()},
            "counts": [len(pairs), pairs.skipped, pairs.blank, pairs.no_caption]}


def formats(tmp_path) -> dict[str, list[str]]:
    """The same kind of captions as a LAVIS json, a captions.jsonl and a captions.csv, and the mixed
    fixture of test_pairs (a COCO file that interleaves images, and a jsonl repeating one of its ids)."""
    rows = [("a.jpg", "a", "a dog"), ("b.jpg", "b", "caf\u00e9, quoted"), ("a.jpg", "a", "a second dog"),
            ("c.jpg", "c", "without features"), ("d.jpg", "d", " ")]
    (tmp_path / "lavis.json").write_text(json.dumps([{"image": i, "image_id": k, "caption": c} for i, k, c in rows]))
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps({"image": i, "id": k, "caption": c}) + "\n"
                                                     for i, k, c in rows))
    (tmp_path / "captions.csv").write_text("image,id,caption\n" + "".join(f'{i},{k},"{c}"\n' for i, k, c in rows))
    (tmp_path / "mixed").mkdir()
    return {"json": [str(tmp_path / "lavis.json")], "jsonl": [str(tmp_path / "captions.jsonl")],
            "csv": [str(tmp_path / "captions.csv")], "mixed": [str(p) for p in caption_files(tmp_path / "mixed")]}


@pytest.fixture
def parses(monkeypatch) -> list:
    """Counts the caption files' parses: one entry per parse."""
    calls, real = [], pairs_module._parse
    monkeypatch.setattr(pairs_module, "_parse", lambda *a: (calls.append(a[0]), real(*a))[1])
    return calls


def no_parse(monkeypatch) -> None:
    monkeypatch.setattr(pairs_module, "_parse", lambda *a: pytest.fail("the caption files were parsed again"))


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "mixed"])
def test_mapped_columns_equal_the_in_memory_ones(tmp_path, cache_root, kind):
    files = formats(tmp_path)[kind]
    memory = read_pairs(files, None, HAS_IMAGE)
    stored = read_pairs(files, None, HAS_IMAGE, accepts="test")
    assert memory.store is None and stored.store.parent == cache_root / "pairs"
    assert isinstance(stored.texts.blob, mmap.mmap) and not stored.texts.offsets.flags.writeable  # mapped, not read
    assert as_lists(stored) == as_lists(memory) and len(memory) >= 2
    assert stored.nbytes() == memory.nbytes()


def test_a_second_run_maps_the_files_without_parsing(tmp_path, monkeypatch, parses, capsys):
    files = formats(tmp_path)["mixed"]
    first = as_lists(read_pairs(files, None, HAS_IMAGE, accepts="test"))
    assert len(parses) == 1
    no_parse(monkeypatch)
    again = read_pairs(files, None, HAS_IMAGE, accepts="test")
    assert as_lists(again) == first
    assert "reused from" in capsys.readouterr().err


def test_a_changed_input_is_parsed_again(tmp_path, parses):
    files = formats(tmp_path)["jsonl"]
    read_pairs(files, None, HAS_IMAGE, accepts="test")
    with open(files[0], "a") as f:
        f.write(json.dumps({"image": "e.jpg", "id": "e", "caption": "a new caption"}) + "\n")
    changed = read_pairs(files, None, HAS_IMAGE, accepts="test")
    assert len(parses) == 2 and changed.texts[-1] == "a new caption"
    other_features = read_pairs(files, None, lambda image_id: image_id == "e", accepts="other features")
    assert len(parses) == 3 and list(other_features.texts) == ["a new caption"]
    assert len({p.store for p in (changed, other_features)}) == 2


def half_write(folder: Path, marker: str, blob: str, damage: str) -> None:
    """`folder` as a killed writer leaves it: no marker (killed before writing it), `blob`
    truncated, or only its temporary folder, of a process that is gone (killed before its rename)."""
    if damage == "no marker":
        (folder / marker).unlink()
    elif damage == "truncated":
        with open(folder / blob, "r+b") as f:
            f.truncate(5)
    else:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        os.rename(folder, folder.with_name(f".{folder.name}.tmp-{os.uname().nodename}-{int(dead.stdout)}"))


@pytest.mark.parametrize("damage", ["no marker", "truncated", "killed writer"])
def test_a_half_written_folder_is_rebuilt(tmp_path, parses, damage):
    files = formats(tmp_path)["mixed"]
    first = read_pairs(files, None, HAS_IMAGE, accepts="test")
    folder, expected = first.store, as_lists(first)
    del first
    half_write(folder, pair_store.MARKER, "texts.bin", damage)
    again = read_pairs(files, None, HAS_IMAGE, accepts="test")
    assert len(parses) == 2 and as_lists(again) == expected
    assert pair_store.problem(folder) is None
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # the dead writer's folder is gone


def test_damaged_contents_are_one_line_naming_the_folder(tmp_path):
    files = formats(tmp_path)["json"]
    folder = read_pairs(files, None, HAS_IMAGE, accepts="test").store
    path = folder / "texts.npy"
    path.write_bytes(b"\0" * path.stat().st_size)  # same size, not a .npy file
    with pytest.raises(BlitextError, match=rf"{folder}.*damaged.*texts.npy.*delete that folder"):
        read_pairs(files, None, HAS_IMAGE, accepts="test")


def test_an_unwritable_cache_root_keeps_the_columns_in_memory(tmp_path, monkeypatch, capsys):
    files = formats(tmp_path)["json"]
    (tmp_path / "not a folder").write_text("")
    monkeypatch.setenv("BLITEXT_CACHE", str(tmp_path / "not a folder"))
    pairs = read_pairs(files, None, HAS_IMAGE, accepts="test")
    assert pairs.store is None and as_lists(pairs) == as_lists(read_pairs(files, None, HAS_IMAGE))
    assert "kept in this process's memory" in capsys.readouterr().err


def rank_script(module: str, function: str, body: str) -> str:
    """A torchrun rank's script: `module.function` counted while `body` runs (a file per call,
    named by rank), then what `body` left in `seen` written as the rank's json."""
    return f"""
import json, os, sys
import torch.distributed as dist
import {module} as patched

out = sys.argv[1]
real = patched.{function}
def counted(*a):
    open(os.path.join(out, f"parsed-{{os.environ['RANK']}}-{{os.getpid()}}"), "w").close()
    return real(*a)
patched.{function} = counted
dist.init_process_group("gloo")
{body}
with open(os.path.join(out, f"rank-{{os.environ['RANK']}}.json"), "w") as f:
    json.dump(seen, f)
dist.destroy_process_group()
"""


def two_ranks_twice(tmp_path, script: str, files: list[str]) -> list[tuple[list[str], list[dict]]]:
    """`script` under a real 2-rank torchrun, run twice on `files`: per run, the ranks whose
    counted function ran, and what each rank saw."""
    (tmp_path / "rank.py").write_text(script)
    runs = []
    for run in ("first", "second"):
        out = tmp_path / run
        out.mkdir()
        two = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(tmp_path / "rank.py"),
                              str(out), *files], capture_output=True, text=True, timeout=300)
        assert two.returncode == 0, two.stderr[-3000:]
        parsed = sorted(p.name.split("-")[1] for p in out.glob("parsed-*"))
        runs.append((parsed, [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]))
    return runs


READ_PAIRS = """pairs = patched.read_pairs(sys.argv[2:], None, lambda image_id: image_id != "c", accepts="test")
seen = {"keys": list(pairs.keys), "image_ids": list(pairs.image_ids), "texts": list(pairs.texts),
        "store": str(pairs.store), "mapped": type(pairs.texts.blob).__name__}"""


def test_torchrun_two_ranks_one_parse(tmp_path):
    files = formats(tmp_path)["mixed"]
    memory = {k: v for k, v in as_lists(read_pairs(files, None, HAS_IMAGE)).items() if k in ("keys", "image_ids", "texts")}
    runs = two_ranks_twice(tmp_path, rank_script("blitext.data.pairs", "_parse", READ_PAIRS), files)
    assert [parsed for parsed, _ in runs] == [["0"], []]  # rank 0 parsed once; the second run none
    for _, seen in runs:
        assert seen[0] == seen[1] and seen[0]["mapped"] == "mmap"
        assert {k: seen[0][k] for k in memory} == memory


def test_a_feature_cache_whose_keys_change_is_a_new_accepts(tmp_path):
    """train-adapter keys the stored columns by CachedFeatures.accepts: the key index's files,
    rewritten whenever the cache's keys change (a resumed or re-made extraction)."""
    from types import SimpleNamespace

    from blitext.cache.keyindex import write_index
    from blitext.data.pairs import CachedFeatures

    features = CachedFeatures.__new__(CachedFeatures)
    features.cache = SimpleNamespace(root=tmp_path)
    write_index(tmp_path, [["a", "b"]])
    before = features.accepts
    assert features.accepts == before and str(tmp_path.resolve()) in before
    write_index(tmp_path, [["a", "b", "c"]])
    assert features.accepts != before
