"""`blitext ablate`: the run plan, the held-out split, WordNet sentences and the command line on tiny
inputs; then `run_ablation(SMOKE)` end to end on easy-VQA with the bundled models (slow, ~3 minutes
on 2 cores): one row per grid cell plus Table 6's, stage-1 runs shared by equal w1, full reuse."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from blitext.recipes import ablate, ablate_report
from blitext.recipes.ablate import plan_cells, run_ablation
from blitext.recipes.ablate_config import SMOKE, TABLE4_GRID, AblateConfig, Cell, parse_grid
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
    splits = ablate._splits(c, src, tmp_path / "work")
    train = json.loads(splits.train.read_text())
    held = json.loads(splits.captions.read_text())
    assert len(train) == 7 and len(held) == 3 and not {e["image_id"] for e in train} & {e["image_id"] for e in held}
    assert splits.vqa is None and "held-out" in splits.caption_source and splits.n_paired == 7
    with pytest.raises(BlitextError, match="2..5"):
        ablate._splits(replace(c, heldout_images=6), src, tmp_path / "work")


def test_cli_maps_options_onto_the_config(monkeypatch):
    from blitext.cli.ablate import ablate_cmd

    seen = []
    monkeypatch.setattr(ablate, "run_ablation", seen.append)
    app = typer.Typer()
    app.command("ablate")(ablate_cmd)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["ablate", "--smoke", "--grid", "0,0;10,100", "--extra-sizes", "0,50",
                                      "--extra-text", "a.txt", "--stage2-steps", "5"])
    assert result.exit_code == 0, result.output
    assert seen == [replace(SMOKE, grid=[(0.0, 0.0), (10.0, 100.0)], text_sizes=[0, 50], extra_text=["a.txt"],
                            recipe=replace(SMOKE.recipe, stage2_steps=5))]  # the demo's recipe, one field changed
    result = CliRunner().invoke(app, ["ablate", "--no-text-sizes", "--extra-sizes", "5"])
    assert result.exit_code == 2 and "contradict" in result.output


def _refuse(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran again: a finished phase was not reused")
    return fail


@pytest.mark.slow
def test_ablation_smoke_shares_stage1_and_reuses_everything(session_cache, monkeypatch):
    monkeypatch.setenv("BLITEXT_CACHE", str(session_cache))  # the bundled LLM is converted once per session
    result = run_ablation(SMOKE)
    work, rows, n = Path(result["out"]), result["rows"], result["n_extra"]

    grid = len(SMOKE.grid)
    assert len(rows) == grid + 1  # + Table 6's paired-only P-Former; paired + extra is the grid's (10, 100)
    assert [(r["w1"], r["w2"]) for r in rows[:grid]] == SMOKE.grid
    assert (rows[-1]["w1"], rows[-1]["w2"], rows[-1]["pformer_text"]) == (10, 100, "paired")
    # one stage 1 per distinct (w1, P-Former): w1 = 0 shared by (0,0) and (0,100), w1 = 10 by (10,0) and (10,100)
    assert sorted(p.name for p in work.glob("stage1-w1_*")) == ["stage1-w1_0", "stage1-w1_10-paired",
                                                             f"stage1-w1_10-paired+{n}"]
    assert len(list(work.glob("stage2-w1_*"))) == len(rows)
    by_w1 = {}
    for r in rows[:grid]:
        by_w1.setdefault(r["w1"], set()).add(r["stage1"])
    assert all(len(runs) == 1 for runs in by_w1.values())
    assert sorted(p.name for p in work.glob("pformer-*")) == ["pformer-paired", f"pformer-paired+{n}"]
    for r in rows:
        assert 0 <= r["scores"]["VQA acc"] <= 100 and "CIDEr" in r["scores"] and "BLEU-4" in r["scores"]
    assert "captions_test.json" in result["caption_source"]
    assert json.loads((work / "ablation.json").read_text())["rows"] == rows
    table = [line for line in (work / "ablation.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows) and "VQA acc" in table[0]

    for module, name in ((ablate, "train_pformer"), (ablate, "train_adapter"), (ablate_report, "eval_vqa"),
                         (ablate_report, "eval_caption")):
        monkeypatch.setattr(module, name, _refuse(name))
    assert run_ablation(SMOKE)["rows"] == rows
