"""`blitext ablate`: the run plan, the held-out split, WordNet sentences, the command line, the sign test
and the pooled per-item counts on tiny inputs; then `blitext ablate --smoke` over two seeds end to end
on easy-VQA with the bundled models (slow): one row per grid cell plus Table 6's at each seed, stage-1
runs shared by equal w1, aggregates, sign tests and budget curves consistent with the rows, full reuse."""
from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from blitext.metrics.stats import sign_test
from blitext.recipes import ablate, ablate_report, budget
from blitext.recipes.ablate import plan_cells
from blitext.recipes.ablate_config import SMOKE, TABLE4_GRID, AblateConfig, Cell, parse_grid
from blitext.recipes.ablate_seeds import aggregate, item_hits, pooled_test, verdict
from blitext.data.text import wordnet_examples
from blitext.errors import BlitextError


def test_grid_parses_and_rejects_bad_cells():
    assert parse_grid("0,0; 10,0;0,100;10,100") == list(TABLE4_GRID)
    assert AblateConfig(grid=[[0, 100], "10,0"]).grid == [(0.0, 100.0), (10.0, 0.0)]
    for bad in ("0", "0,x", "-1,0", ""):
        with pytest.raises(BlitextError):
            AblateConfig(grid=bad)


def test_plan_has_the_grid_then_table6_cells():
    cells = plan_cells(AblateConfig(), 1200)
    assert cells[:4] == [Cell(0, 0, None), Cell(10, 0, 1200), Cell(0, 100, 1200), Cell(10, 100, 1200)]
    assert cells[4:] == [Cell(10, 100, 0)]  # paired + all extra is the grid's own (10, 100) cell
    assert plan_cells(AblateConfig(text_sizes=False), 1200) == cells[:4]
    assert plan_cells(AblateConfig(grid="0,0", text_sizes=[0, 500]), 1200) == \
        [Cell(0, 0, None), Cell(10, 100, 0), Cell(10, 100, 500)]
    with pytest.raises(BlitextError, match="0..1200"):
        plan_cells(AblateConfig(text_sizes=[5000]), 1200)


def test_wordnet_examples_are_the_quoted_sentences(tmp_path):
    (tmp_path / "data.verb").write_text(
        "  1 licence text with \"quotes\" \n"
        "00004032 29 v 02 sigh 0 | heave or utter a sigh; \"She sighed sadly\"  \n"
        "00004492 29 v 01 hold 4 | keep from exhaling; \"hold your breath\"; \"She sighed sadly\"\n")
    assert wordnet_examples(tmp_path) == ["She sighed sadly", "hold your breath"]
    assert wordnet_examples(tmp_path / "missing") == []


def test_heldout_split_without_a_test_file(tmp_path):
    data = tmp_path / "stamps"
    data.mkdir()
    (data / "captions.json").write_text(json.dumps(
        [{"image": f"images/{i}.png", "caption": [f"stamp {i}"], "image_id": str(i)} for i in range(10)]))
    c = AblateConfig(data=str(data), heldout_images=3)
    src = ablate._source(c, tmp_path)
    splits = ablate._splits(c, src, tmp_path / "work", 42)
    train = json.loads(splits.train.read_text())
    held = json.loads(splits.captions.read_text())
    assert len(train) == 7 and len(held) == 3 and not {e["image_id"] for e in train} & {e["image_id"] for e in held}
    assert splits.vqa is None and "held-out" in splits.caption_source and splits.n_paired == 7
    other = json.loads(ablate._splits(c, src, tmp_path / "seed-1", 1).captions.read_text())
    assert {e["image_id"] for e in other} != {e["image_id"] for e in held}  # each seed draws its own slice
    with pytest.raises(BlitextError, match="2..5"):
        ablate._splits(replace(c, heldout_images=6), src, tmp_path / "work", 42)


def test_cli_maps_options_onto_the_config(monkeypatch):
    from blitext.cli.ablate import ablate_cmd

    seen = []
    monkeypatch.setattr(ablate, "run_ablation", seen.append)
    app = typer.Typer()
    app.command("ablate")(ablate_cmd)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["ablate", "--smoke", "--grid", "0,0;10,100", "--extra-sizes", "0,50",
                                      "--extra-text", "a.txt", "--stage2-steps", "5", "--seeds", "42", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert seen == [replace(SMOKE, grid=[(0.0, 0.0), (10.0, 100.0)], text_sizes=[0, 50], extra_text=["a.txt"],
                            seeds=[42, 1], recipe=replace(SMOKE.recipe, stage2_steps=5))]  # one recipe field changed
    assert AblateConfig().seeds == [42] and AblateConfig(seeds=7).seeds == [7]
    with pytest.raises(BlitextError, match="distinct"):
        AblateConfig(seeds=[1, 1])
    result = CliRunner().invoke(app, ["ablate", "--no-text-sizes", "--extra-sizes", "5"])
    assert result.exit_code == 2 and "contradict" in result.output


def test_sign_test_exact_values():
    assert sign_test(9, 1) == pytest.approx(0.021484375)  # 2 x (1 + 10) / 2^10
    assert sign_test(1, 9) == sign_test(9, 1)
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(5, 0) == pytest.approx(0.0625)


def _eval_folder(folder: Path, task: str, config: dict, predictions: list[dict], **extra) -> str:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"task": task, "metrics": {}, "provenance": {"config": config},
                                                     **extra}))
    (folder / "predictions.json").write_text(json.dumps(predictions))
    return str(folder)


def test_pooled_counts_read_the_prediction_files(tmp_path):
    """(0,0) and a cell at two seeds on hand-made caption predictions: wins are items only the cell gets
    exactly right, losses items only (0,0) does, pooled over (seed, image)."""
    captions = tmp_path / "captions_test.json"
    captions.write_text(json.dumps([{"image": f"{i}.png", "caption": [f"a red shape {i}"], "image_id": str(i)}
                                    for i in range(4)]))
    right = lambda i: f"A red shape {i}."  # punctuation and case do not count  # noqa: E731
    config = {"data": str(captions), "limit": None}
    # seed 42: the cell right on 0, 1, 2; (0,0) on 2, 3 -> wins {0, 1}, loss {3}, tie {2}
    # seed 1:  the cell right on 0, 1;    (0,0) on none -> wins {0, 1}, ties {2, 3}
    right_on = {("cell", 42): {0, 1, 2}, ("base", 42): {2, 3}, ("cell", 1): {0, 1}, ("base", 1): set()}
    rows = [{"cell": "(10,100) paired" if who == "cell" else "(0,0)", "seed": seed,
             "eval": {"caption": _eval_folder(tmp_path / f"{who}-{seed}", "caption", config,
                                              [{"image_id": i, "caption": right(i) if i in on else "a blue shape"}
                                               for i in range(4)])}}
            for (who, seed), on in right_on.items()]
    assert item_hits(rows[0]["eval"]["caption"]) == {"0": True, "1": True, "2": True, "3": False}
    t = pooled_test(rows, "(10,100) paired", "(0,0)", "caption")
    assert (t["items"], t["wins"], t["losses"], t["ties"], t["seeds"]) == (8, 4, 1, 3, [1, 42])
    assert t["sign_test_p"] == pytest.approx(sign_test(4, 1)) == pytest.approx(0.375)
    assert pooled_test(rows, "(10,100) paired", "(0,0)", "vqa") is None


def test_vqa_hits_need_full_credit(tmp_path):
    questions, annotations = tmp_path / "q.json", tmp_path / "a.json"
    questions.write_text(json.dumps({"questions": [{"question_id": q, "image_id": "i", "question": "what?"}
                                                   for q in range(3)]}))
    humans = [["red"] * 10, ["red"] * 4 + ["blue"] * 6, ["red"] * 3 + ["blue"] * 7]  # 1, 1 and 0.9 for "red"
    annotations.write_text(json.dumps({"annotations": [
        {"question_id": q, "image_id": "i", "answers": [{"answer": a} for a in h]} for q, h in enumerate(humans)]}))
    folder = _eval_folder(tmp_path / "vqa", "vqa", {"data": str(questions), "annotations": str(annotations),
                                                    "limit": None},
                          [{"question_id": q, "answer": "red"} for q in range(3)], answer_normalisation="official")
    assert item_hits(folder) == {"0": True, "1": True, "2": False}


def test_verdict_says_when_a_score_is_at_its_floor():
    def cell(name, exact, hits, steps):
        return {"cell": name, "seeds": [42, 1], "mean": {"exact": exact}, "std": {"exact": 0.01},
                "budget": {"steps_to_goal": steps, "median_steps_to_goal": 10, "all_reached": True},
                "versus_baseline": {"caption": hits} if hits else {}}
    base = cell("(0,0)", 0.0, None, [None, None])
    floor = verdict(cell("(0,100) paired", 0.0, {"items": 12, "wins": 0, "losses": 0, "ties": 12,
                                                  "sign_test_p": 1.0, "seeds": [1, 42]}, [None, None]), base)
    assert floor == "(0,100) paired vs (0,0): exact 0 in both (at its floor: no comparison); neither reaches 0.85 exact"
    better = verdict(cell("(10,100) paired", 0.9, {"items": 12, "wins": 9, "losses": 1, "ties": 2,
                                                   "sign_test_p": sign_test(9, 1), "seeds": [1, 42]}, [10, 10]), base)
    assert "exact 0.90±0.01 vs 0.00±0.01; better on 9 images, worse on 1 (2 ties), sign test p=0.021 (2 seeds)" \
        in better and better.endswith("step 10 (median of 10, 10) vs never")


def test_terminal_table_stays_whole_at_80_columns_and_a_vqa_floor_is_said(tmp_path):
    """The printed table keeps the verdict's columns whole at 80 columns (3 seeds, long text labels);
    VQA at the LLM's own text floor (eval vqa's ceiling_verdict) becomes one verdict line."""
    from rich.console import Console

    def cell(w1, w2, text, steps):
        return {"w1": w1, "w2": w2, "pformer_text": text, "seeds": [42, 1, 2], "budget": {"steps_to_goal": steps},
                "mean": {"exact": 0.5, "CIDEr": 3.25, "VQA acc": 42.5}, "std": {"exact": 0.41, "CIDEr": 2.5, "VQA acc": 3.1}}
    out = Console(width=80, record=True)
    out.print(ablate_report._terminal_table({"data": "easy-vqa-500", "seeds": [42, 1, 2]},
                                            [cell(0, 0, "none (BLIP-2)", [150, 100, None]),
                                             cell(10, 100, "paired+48000", [0, 0, 25])]))
    text = out.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    for whole in ("none (BLIP-2)", "paired+48000", "0.50±0.41", "3.25±2.50", "42.5±3.1", "150,100,-", "0,0,25"):
        assert whole in text, whole

    def vqa_eval(name, near_floor):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps(
            {"task": "vqa", "ceiling_verdict": {"near_floor": near_floor, "line": f"{name}: cannot answer"}}))
        return {"eval": {"vqa": str(folder)}}
    assert ablate_report.vqa_floor([{"eval": {}}, vqa_eval("low", True)]) == "low: cannot answer"
    assert ablate_report.vqa_floor([{"eval": {}}, vqa_eval("fine", False)]) is None


def _refuse(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran again: a finished phase was not reused")
    return fail


def _smoke_cli(extra: list[str] = ()):
    from blitext.cli.ablate import ablate_cmd

    app = typer.Typer()
    app.command("ablate")(ablate_cmd)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["ablate", "--smoke", "--seeds", "42", "--seeds", "1", *extra])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_ablation_smoke_over_two_seeds_end_to_end(session_cache, monkeypatch):
    monkeypatch.setenv("BLITEXT_CACHE", str(session_cache))  # the bundled LLM is converted once per session
    output = _smoke_cli()
    [record] = (session_cache / "runs" / "ablate").glob("*/ablation.json")
    work, result = record.parent, json.loads(record.read_text())
    rows, n, seeds, grid = result["rows"], result["n_extra"], [42, 1], len(SMOKE.grid)

    assert result["seeds"] == seeds and [r["seed"] for r in rows] == [42] * (grid + 1) + [1] * (grid + 1)
    for seed in seeds:
        mine = [r for r in rows if r["seed"] == seed]
        assert [(r["w1"], r["w2"]) for r in mine[:grid]] == SMOKE.grid  # + Table 6's paired-only P-Former
        assert (mine[-1]["w1"], mine[-1]["w2"], mine[-1]["pformer_text"]) == (10, 100, "paired")
        # one stage 1 per distinct (w1, P-Former): w1 = 0 shared by (0,0) and (0,100), w1 = 10 by (10,0), (10,100)
        assert sorted(p.name for p in (work / f"seed-{seed}").glob("stage1-w1_*")) == \
            ["stage1-w1_0", "stage1-w1_10-paired", f"stage1-w1_10-paired+{n}"]
        assert len({r["stage1"] for r in mine[:grid] if r["w1"] == 0}) == 1
        assert sorted(p.name for p in (work / f"seed-{seed}").glob("pformer-*")) == \
            ["pformer-paired", f"pformer-paired+{n}"]
    for r in rows:
        assert 0 <= r["scores"]["VQA acc"] <= 100 and {"exact", "CIDEr"} <= set(r["scores"])
        # BLEU-4 over easy-VQA's 3-word references measures nothing: no column, a line in the note
        void = r["metrics"].get("undefined", {})
        assert ("BLEU-4" in r["scores"]) == ("Bleu_4" in r["metrics"]["caption"]) == ("Bleu_4" not in void)
        # the budget curve: step 0, the snapshot, the end; its end is the table's greedy exact match
        assert [p["step"] for p in r["curve"]] == [0, *SMOKE.recipe.snapshot_steps, SMOKE.recipe.stage2_steps]
        assert r["curve"][-1]["exact_match"] == r["scores"]["exact"]
        assert r["curve"][0].get("untrained_llm_proj", False) == (r["w1"] == 0)
        hits = item_hits(r["eval"]["caption"])
        assert len(hits) == SMOKE.caption_images and sum(hits.values()) / len(hits) == r["scores"]["exact"]
    assert "captions_test.json" in result["caption_source"]

    cells = result["cells"]
    assert [x["cell"] for x in cells] == list(dict.fromkeys(r["cell"] for r in rows)) and len(cells) == grid + 1
    assert cells == aggregate(rows, ablate_report.table_columns(rows))
    for x in cells:
        mine = [r for r in rows if r["cell"] == x["cell"]]
        assert x["seeds"] == seeds and len(x["budget"]["steps_to_goal"]) == 2
        for column in ("exact", "CIDEr", "VQA acc"):
            values = [r["scores"][column] for r in mine]
            assert x["mean"][column] == pytest.approx(statistics.mean(values))
            assert x["std"][column] == pytest.approx(statistics.stdev(values))
        if (x["w1"], x["w2"]) == (0, 0):
            assert x["versus_baseline"] == {}
            continue
        base = [r for r in rows if (r["w1"], r["w2"]) == (0, 0)]
        for task, column, per_item in (("caption", "exact", SMOKE.caption_images), ("vqa", "VQA acc", SMOKE.vqa_questions)):
            t = x["versus_baseline"][task]
            assert t["items"] == 2 * per_item and t["wins"] + t["losses"] + t["ties"] == t["items"]
            assert t["sign_test_p"] == sign_test(t["wins"], t["losses"]) and t["seeds"] == [1, 42]
            # wins - losses = the cell's right items minus (0,0)'s, from the scores the evaluations wrote
            scale = 100 if column.startswith("VQA") else 1
            gap = sum(r["scores"][column] for r in mine) - sum(r["scores"][column] for r in base)
            assert t["wins"] - t["losses"] == round(gap * per_item / scale)
    assert len(result["verdicts"]) == len(cells)
    assert all(line.startswith(x["cell"]) for line, x in zip(result["verdicts"], cells))
    assert all(line.split(": ", 1)[0] in output for line in result["verdicts"])
    md = (work / "ablation.md").read_text()
    assert all(f"{name} not shown: {why}" in md for r in rows for name, why in r["metrics"].get("undefined", {}).items())
    assert "![budget curve](budget-curve.png)" in md and (work / "budget-curve.png").is_file()
    assert "Sign test:" in md and md.count("\n| ") >= 2 * len(rows)
    assert (work / "seed-1" / "stage2-curves.png").is_file()

    for module, name in ((ablate, "train_pformer"), (ablate, "train_adapter"), (ablate_report, "eval_vqa"),
                         (ablate_report, "eval_caption"), (budget, "eval_caption")):
        monkeypatch.setattr(module, name, _refuse(name))
    _smoke_cli()
    assert json.loads(record.read_text())["rows"] == rows
