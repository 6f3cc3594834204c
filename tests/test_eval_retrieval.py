"""blitext eval retrieval and compare, refusals and the command line, on tiny adaptors trained in
adapter_world's world. Captioning and VQA: test_eval.py."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from blitext.models.adapter_checkpoint import load_adapter
from blitext.cache import FeatureCache
from blitext.cli.eval import compare_cmd, eval_app
from blitext.data.readers import read_image_set
from blitext.data.text import caption_key
from blitext.errors import BlitextError
from blitext.evaluation.compare import compare_runs
from blitext.evaluation.evaluate import eval_caption, eval_retrieval
from blitext.features.image import ExtractConfig, extract_features
from adapter_world import N_IMAGES, common, read, runs, world  # noqa: F401


# ---------------------------------------------------------------- retrieval

@pytest.fixture(scope="module")
def retrieval(world, runs, tmp_path_factory) -> dict:  # noqa: F811
    root = tmp_path_factory.mktemp("retrieval")
    return {k: eval_retrieval(common(world, runs, adapter=str(runs["s1"]), limit=N_IMAGES, k=k, out=str(root / f"k{k}")))
            | {"out": root / f"k{k}"} for k in (1, 3, 128)}


def itc_and_itm(world, runs):  # noqa: F811
    """The test's own ITC matrix and ITM matrix (n_images, n_texts), from the raw Q-Former calls."""
    adapter = load_adapter(runs["s1"])
    model = adapter.model
    records = read_image_set(world["captions"]).records[:N_IMAGES]
    texts = [c for r in records for c in r.captions]
    feats, mask = FeatureCache(world["features"]).get_batch([r.id for r in records])
    tok = adapter.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = F.normalize(model.vision_proj(model.query_output(feats.float(), mask)), dim=-1)  # (N, Q, E)
        text = F.normalize(model.text_proj(model.text_output(tok.input_ids, tok.attention_mask)[:, 0]), dim=-1)
        itc = torch.einsum("iqe,te->iqt", image, text).max(1).values
        q = model.n_prompt
        att = torch.cat([torch.ones(len(texts), q, dtype=torch.long), tok.attention_mask], 1)
        itm = torch.stack([model.itm_head(model.joint_output(tok.input_ids, feats[i:i + 1].float().expand(len(texts), -1, -1),
                                                             att)[:, :q])[..., 1].mean(1) for i in range(len(records))])
    keys = [caption_key(r.id, n) for r in records for n in range(len(r.captions))]
    return itc, itm, keys


def reranked(itc: list[float], both: list[float], k: int, tol: float = 1e-5) -> bool:
    """Scores of one query's candidates in predicted order: the first k are ITC's k best, ordered by
    ITM + ITC (`both`); the rest keep ITC's descending order (up to the float noise of a different
    batching)."""
    head, tail = itc[:k], itc[k:]
    return descending(both[:k], tol) and descending(tail, tol) and (not tail or min(head) >= max(tail) - tol)


def descending(scores: list[float], tol: float = 1e-5) -> bool:
    return all(a >= b - tol for a, b in zip(scores, scores[1:]))


def test_retrieval_reranks_only_inside_the_top_k(world, runs, retrieval):  # noqa: F811
    itc, itm, keys = itc_and_itm(world, runs)
    assert itc.shape == itm.shape == (N_IMAGES, 8)
    # images rank the texts differently, and ITM reorders ITC: a misrouted query or score would show
    assert len({tuple(row.argsort().tolist()) for row in itc}) > 1
    assert len({tuple(row.argsort().tolist()) for row in itm + itc}) > 1
    both = itm + itc
    for k in (1, 3, 128):
        result = retrieval[k]
        m = result["metrics"]
        assert all(0 <= m[f"{d}_r{n}"] <= 100 for d in ("txt", "img") for n in (1, 5, 10))
        assert m["txt_r10"] == m["img_r10"] == 100  # <= 10 candidates each way
        assert result["counts"] == {"images": N_IMAGES, "texts": 8, "k": min(k, 8)}
        predictions = read(result["out"] / "predictions.json")
        for i, row in enumerate(predictions["image_to_text"]):
            assert sorted(row["top10"]) == sorted(keys)
            order = [keys.index(t) for t in row["top10"]]
            assert reranked(itc[i, order].tolist(), both[i, order].tolist(), k), (k, i, row)
        for j, row in enumerate(predictions["text_to_image"]):
            order = [int(x[3:]) for x in row["top10"]]
            assert reranked(itc[order, j].tolist(), both[order, j].tolist(), k), (k, j, row)
    top = read(retrieval[128]["out"] / "predictions.json")["image_to_text"][0]["top10"]
    assert top != read(retrieval[1]["out"] / "predictions.json")["image_to_text"][0]["top10"]  # ITM did reorder


def test_compare_runs_lines_up_two_metric_folders(retrieval):
    rows, columns = compare_runs([retrieval[1]["out"], retrieval[128]["out"]])
    assert columns == ["eval", "metric", "k1", "k128"]
    table = {(r[0], r[1]): r[2:] for r in rows}
    assert table[("retrieval-captions_train", "txt_r1")] == [retrieval[1]["metrics"]["txt_r1"],
                                                           retrieval[128]["metrics"]["txt_r1"]]
    assert len(rows) == len(retrieval[1]["metrics"])  # every numeric metric, once
    with pytest.raises(BlitextError, match="holds no metrics.json"):
        compare_runs([retrieval[1]["out"].parent])


# ---------------------------------------------------------------- refusals and the command line

def test_refusals_are_one_line_errors(tmp_path, world, runs, vision_folders):  # noqa: F811
    app = typer.Typer()
    app.add_typer(eval_app, name="eval")
    runner = CliRunner()
    other = tmp_path / "features-clip"
    extract_features(ExtractConfig(data=str(world["captions"]), out=str(other), vision_encoder=str(vision_folders["clip"]),
                                   batch_size=8, shard_size=16, num_workers=0, device="cpu"))
    r = runner.invoke(app, ["eval", "caption", "--adapter", str(runs["s2"]), "--features", str(other),
                            "--data", str(world["captions"])])
    assert r.exit_code == 2 and "this run expects" in r.output and "extract-features" in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    with pytest.raises(BlitextError, match="stage-1 adaptor"):
        eval_caption(common(world, runs, adapter=str(runs["s1_plain"]), out=str(tmp_path / "s1")))
    extra = tmp_path / "more.json"
    extra.write_text(json.dumps(read(world["captions"]) + [{"image": "images/x.png", "image_id": "imgX", "caption": "x"}]))
    with pytest.raises(BlitextError, match=r"1 of 17 images .* \(first: 'imgX'\)"):
        eval_retrieval(common(world, runs, data=str(extra), out=str(tmp_path / "x")))
    r = runner.invoke(app, ["eval", "retrieval", "--features", str(world["features"])])
    assert r.exit_code == 2 and "needs --adapter" in r.output


def test_cli_caption_retrieval_and_compare(tmp_path, world, runs):  # noqa: F811
    app = typer.Typer()
    app.add_typer(eval_app, name="eval")
    app.command("compare")(compare_cmd)
    runner = CliRunner()
    base = ["--adapter", str(runs["s2"]), "--features", str(world["features"]), "--data", str(world["captions"]),
            "--limit", "4", "--device", "cpu"]
    r = runner.invoke(app, ["eval", "caption", *base, "--num-beams", "1", "--max-new-tokens", "3", "--min-new-tokens",
                            "1", "--tokenizer", "python", "--meteor", "off", "--spice", "off", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "CIDEr" in r.output and read(tmp_path / "c" / "metrics.json")["counts"] == {"images": 4}
    (tmp_path / "retrieval.json").write_text(json.dumps({"k": 2, "batch_size": 3}))  # a --config file
    r = runner.invoke(app, ["eval", "retrieval", *base, "--config", str(tmp_path / "retrieval.json")])
    assert r.exit_code == 0, r.output
    assert read(runs["s2"] / "eval" / "retrieval-captions_train" / "metrics.json")["counts"]["k"] == 2
    r = runner.invoke(app, ["compare", str(runs["s2"]), str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "txt_r1" in r.output and "CIDEr" in r.output
