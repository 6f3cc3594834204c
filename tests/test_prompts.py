"""build-prompts end to end on a tiny trained P-Former: both stores read back equal, refusal, resume, torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blitext.cache.manifest import MANIFEST, shard_name, sidecar_name
from blitext.cache.verify import verify_cache
from blitext.errors import BlitextError
from blitext.pformer.train import PFormerConfig, train_pformer
from blitext.pformer.prompts import BuildPromptsConfig, PromptCache, build_prompts, load_pformer
from conftest import BERT_WORDS, assert_tells_apart

BIN = Path(sys.executable).parent
WORDS = [w for w in BERT_WORDS if w.isalpha() and w.islower()]
N_PROMPT, D_LLM = 4, 32  # the tiny P-Former's prompts: 4 slots in the tiny OPT's 32-wide embedding space


@pytest.fixture(scope="module")
def pformer_run(tmp_path_factory, llm_folders, bert_folder) -> Path:
    """A P-Former trained for 2 steps: enough for real weights, a state.json and <run>/final."""
    root = tmp_path_factory.mktemp("pformer")
    text = root / "text.txt"
    text.write_text("\n".join(f"{a} {b} {c}" for a, b, c in zip(WORDS, WORDS[3:] + WORDS[:3], WORDS[7:] + WORDS[:7]))
                    + "\n")
    train_pformer(PFormerConfig(text=[str(text)], out=str(root / "run"), llm=str(llm_folders["opt"]),
                                text_encoder=str(bert_folder), batch_size=4, heldout=2, n_prompt=N_PROMPT,
                                max_steps=2, warmup_steps=1, sample_every=1000, n_samples=1, device="cpu"))
    return root / "run"


@pytest.fixture
def captions(tmp_path) -> tuple[Path, list[str], list[str]]:
    """A LAVIS caption .json of 5 images, 2 captions each but img2 with 1: (file, keys, captions)."""
    entries, keys, texts = [], [], []
    for i in range(5):
        caps = [f"a {WORDS[i]} {WORDS[i + 4]}", f"two {WORDS[i + 1]} dogs play in the grass"][:1 + (i != 2)]
        entries.append({"image": f"img{i}.png", "caption": caps, "image_id": f"img{i}"})
        keys += [f"img{i}#{k}" for k in range(len(caps))]
        texts += caps
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(entries))
    return path, keys, texts


def build(pformer_run: Path, captions: Path, out: Path, **kw) -> dict:
    return build_prompts(BuildPromptsConfig(pformer=str(pformer_run), captions=[str(captions)], out=str(out),
                                            device="cpu", **{"batch_size": 4, "shard_size": 8, **kw}))


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.h5"))}


def test_compact_and_full_stores_give_the_pformers_own_prompts(tmp_path, pformer_run, captions):
    path, keys, texts = captions
    compact = build(pformer_run, path, tmp_path / "compact", store="compact")
    full = build(pformer_run, path, tmp_path / "full", store="full")
    assert compact["rows"] == full["rows"] == len(keys) == 9
    assert compact["row_shape"] == [32] and full["row_shape"] == [N_PROMPT, D_LLM]  # [CLS] vs prompts
    assert compact["bytes_per_row"] < full["bytes_per_row"]
    assert verify_cache(tmp_path / "compact").ok and verify_cache(tmp_path / "full").ok

    a, b = PromptCache(tmp_path / "compact"), PromptCache(tmp_path / "full")
    assert a.keys == b.keys == keys  # caption keys <image_id>#<k>, in file order
    pa, pb = a.get_batch(keys), b.get_batch(keys)
    assert pa.shape == (9, N_PROMPT, D_LLM) and pa.dtype == torch.float32
    # the closest two captions' prompts are further apart than any tolerance below (2e-3 at most)
    i, j = min(((i, j) for i in range(9) for j in range(i + 1, 9) if texts[i] != texts[j]),
               key=lambda ij: float((pa[ij[0]] - pa[ij[1]]).abs().max()))
    assert_tells_apart(pa[i], pa[j], f"the P-Former's prompts for {texts[i]!r} and {texts[j]!r}", 2e-3)
    torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a["img3#1"], pb[keys.index("img3#1")], rtol=1e-6, atol=1e-6)

    # the same as the P-Former's own forward pass over the captions, in one batch
    loaded = load_pformer(pformer_run)
    assert not loaded.model.training
    enc = loaded.tokenizer(texts, padding=True, truncation=True, max_length=loaded.state["config"]["max_text_len"],
                           return_tensors="pt")
    with torch.no_grad():
        own = loaded.model(enc.input_ids, enc.attention_mask).prompts  # (9, P, d_llm)
    torch.testing.assert_close(pa, own, rtol=1e-5, atol=1e-6)
    assert a.producer["pformer"] == loaded.fingerprint and a.producer["llm"] == loaded.llm_fingerprint


def test_a_cache_for_another_llm_is_refused(tmp_path, pformer_run, captions):
    build(pformer_run, captions[0], tmp_path / "prompts")
    made_by = PromptCache(tmp_path / "prompts").producer["llm"]
    with pytest.raises(BlitextError) as e:
        PromptCache(tmp_path / "prompts", expect={"llm": "other@123"})
    assert made_by in str(e.value) and "other@123" in str(e.value)
    assert "build-prompts" in str(e.value)  # and names the fix


def test_an_interrupted_build_resumes_to_the_same_cache(tmp_path, pformer_run, captions):
    out = tmp_path / "prompts"
    build(pformer_run, captions[0], out, batch_size=2, shard_size=2)
    assert len(shard_bytes(out)) == 5
    first, before = shard_bytes(out), PromptCache(out).get_batch(captions[1])
    kept = {name: os.stat(out / name).st_mtime_ns for name in first if name != shard_name(4)}
    # as if killed while the last shard was being finished: its sidecar and the manifest are missing
    (out / sidecar_name(4)).unlink()
    (out / MANIFEST).unlink()
    with pytest.raises(BlitextError, match="unfinished"):
        PromptCache(out)
    build(pformer_run, captions[0], out, batch_size=2, shard_size=2)
    assert shard_bytes(out) == first
    assert {name: os.stat(out / name).st_mtime_ns for name in kept} == kept  # finished shards were kept, not redone
    assert verify_cache(out).ok
    assert torch.equal(PromptCache(out).get_batch(captions[1]), before)
    with pytest.raises(BlitextError, match="different shard size"):  # a resume is the same job or refused
        build(pformer_run, captions[0], out, batch_size=2, shard_size=4)


def test_torchrun_two_ranks_equal_one_process(tmp_path, pformer_run, captions):
    path, keys, _ = captions
    # Byte equality holds when every process runs the same number of intra-op threads (float sums
    # split over threads add in another order): torchrun gives each rank one, so the reference does too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build(pformer_run, path, tmp_path / "one", batch_size=2, shard_size=2)
    finally:
        torch.set_num_threads(threads)
    build(pformer_run, path, tmp_path / "many", batch_size=2, shard_size=2)  # the machine's default threads
    args = ["build-prompts", "--pformer", str(pformer_run), "--captions", str(path), "--batch-size", "2",
            "--shard-size", "2", "--device", "cpu", "--out", str(tmp_path / "two")]
    two = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python",
                          str(BIN / "blitext"), *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(shard_bytes(tmp_path / "two")) == 5  # rank 0 wrote shards 0, 2, 4; rank 1 shards 1, 3
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    assert (tmp_path / "one" / "head.safetensors").read_bytes() == (tmp_path / "two" / "head.safetensors").read_bytes()
    assert PromptCache(tmp_path / "two").keys == keys
    assert torch.equal(PromptCache(tmp_path / "one").get_batch(keys), PromptCache(tmp_path / "two").get_batch(keys))
    # At other thread counts the values agree to rounding, not to the byte.
    torch.testing.assert_close(PromptCache(tmp_path / "many").get_batch(keys), PromptCache(tmp_path / "one").get_batch(keys),
                               rtol=2e-3, atol=2e-3)


def test_a_repeated_caption_id_is_refused_naming_it(tmp_path, pformer_run):
    """Two files giving one image's captions twice would make two rows of one key: refused in a
    line naming the id, found without a set of every id (text.first_repeat)."""
    rows = [{"image": f"img{i}.png", "caption": [f"a {WORDS[i]} dog"], "image_id": f"img{i}"} for i in range(4)]
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(rows))
    second.write_text(json.dumps(rows[2:3]))
    with pytest.raises(BlitextError, match=r"caption id 'img2#0' repeats in .*a\.json, .*b\.json"):
        build_prompts(BuildPromptsConfig(pformer=str(pformer_run), captions=[str(first), str(second)],
                                         out=str(tmp_path / "out"), device="cpu"))


def test_caption_files_give_the_pairs_keys_in_every_format(tmp_path, pformer_run, captions):
    """build-prompts reads captions as train-adapter does: a captions.jsonl (row by row, one row
    per caption, an image's rows apart) gives the same keys and rows as the same captions in a
    LAVIS .json; a text file keeps <file>:<line> ids; the two kinds mixed are refused."""
    from blitext.data.pairs import read_pairs

    path, keys, texts = captions
    rows = [{"image": f"img{i}.png", "id": f"img{i}", "caption": t} for k, t in zip(keys, texts)
            for i in [int(k.split("#")[0][3:])]]
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows[1::2] + rows[0::2]))  # images interleaved
    from_json = build(pformer_run, path, tmp_path / "json")
    from_jsonl = build(pformer_run, jsonl, tmp_path / "jsonl")
    assert from_jsonl["rows"] == from_json["rows"] == 9
    a, b = PromptCache(tmp_path / "json"), PromptCache(tmp_path / "jsonl")
    assert list(b.keys) == list(read_pairs([str(jsonl)], None, lambda image_id: True).keys)
    assert sorted(b.keys) == sorted(a.keys) == sorted(keys)
    by_text = dict(zip(keys, texts))
    jsonl_texts = {f"img{r['id'][3:]}": [] for r in rows}
    for r in rows[1::2] + rows[0::2]:
        jsonl_texts[r["id"]].append(r["caption"])
    for key in b.keys:  # the same caption under the same key: the same prompt
        image, k = key.split("#")
        if jsonl_texts[image][int(k)] == by_text[key]:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)  # other batches, other padding

    text = tmp_path / "sentences.txt"
    text.write_text("a red dog\n\ntwo blue dogs\n")
    build(pformer_run, text, tmp_path / "text")
    assert list(PromptCache(tmp_path / "text").keys) == ["sentences.txt:1", "sentences.txt:3"]
    with pytest.raises(BlitextError, match="mixes text files"):
        build_prompts(BuildPromptsConfig(pformer=str(pformer_run), captions=[str(path), str(text)],
                                         out=str(tmp_path / "mixed"), device="cpu"))
