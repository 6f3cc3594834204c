"""blitext.plot: real metrics.jsonl files (written by training.MetricsLog) become a decodable PNG
with the expected panels; smoothing, labels and the user errors."""
from __future__ import annotations

import math
import os

import pytest
from PIL import Image

from blitext.errors import BlitextError
from blitext.plot import moving_average, plot_keys, plot_runs, read_records, run_labels, series, wants_log_scale
from blitext.training import MetricsLog

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(folder, steps=40, scale=1.0, extra=None):
    """A run folder like pformer's: training lines every step, an evaluation line every 10."""
    folder.mkdir(parents=True)
    log = MetricsLog(folder / "metrics.jsonl")
    for step in range(steps):
        loss = scale * 5.0 * math.exp(-step / 8)  # 5.0 -> ~0.04: > 100x, so a log y-axis
        log.write({"step": step, "lr": 1e-4 * min(1.0, (step + 1) / 5), "loss": loss, "loss_itc": loss / 2,
                   "sentences_per_s": 120.0 + step, "temp": 0.07, "finished": step == steps - 1, **(extra or {})})
        if step % 10 == 9:
            log.write({"step": step, "heldout_token_accuracy": step / steps, "samples": [["a cat", "a dog"]]})
    return folder


@pytest.fixture
def two_runs(tmp_path):
    return [write_run(tmp_path / "a" / "run"), write_run(tmp_path / "b" / "run", steps=25, scale=2.0)]


def test_plot_writes_a_decodable_png(two_runs, tmp_path):
    out = tmp_path / "plots" / "curves.png"
    assert plot_runs(two_runs, out, smooth=3) == out
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        # 5 panels -> 3 columns x 2 rows of 4.8 x 3.2 in at 100 dpi (constrained layout may trim a little)
        assert image.format == "PNG" and 1200 <= image.width <= 1500 and 600 <= image.height <= 750
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # the temp file is gone


def test_plot_accepts_the_jsonl_path_and_chosen_keys(two_runs, tmp_path):
    out = plot_runs([two_runs[0] / "metrics.jsonl"], tmp_path / "one.png", keys=["heldout_token_accuracy"])
    with Image.open(out) as image:
        assert image.width < 600  # one panel


def test_default_panels_skip_step_rates_and_non_numbers(two_runs):
    by_run = {str(i): read_records(run / "metrics.jsonl") for i, run in enumerate(two_runs)}
    # "temp" is 0.07 at every step of both runs: a flat panel, left out unless asked for
    assert plot_keys(by_run, None) == ["loss", "lr", "loss_itc", "heldout_token_accuracy"]
    # asked-for keys keep their order, lose duplicates, and may include rates
    assert plot_keys(by_run, ["temp", "sentences_per_s", "temp"]) == ["temp", "sentences_per_s"]
    assert plot_keys(by_run, []) == plot_keys(by_run, None)
    # a key logged by only one run is still a panel
    assert "only_b" in plot_keys({"a": [{"step": 0, "loss": 1.0}], "b": [{"step": 0, "only_b": 2}]}, None)


def test_series_takes_each_keys_own_steps():
    records = [{"step": 0, "loss": 3.0}, {"step": 1, "loss": float("nan")}, {"step": 2, "loss": 1.0},
               {"step": 2, "acc": 0.5}, {"step": 2, "loss": 0.9}]
    assert series(records, "loss") == ([0, 2], [3.0, 0.9])  # NaN left out, a repeated step keeps the last
    assert series(records, "acc") == ([2], [0.5])


def test_moving_average_is_a_trailing_mean():
    assert moving_average([1, 2, 3, 4, 5], 1) == [1, 2, 3, 4, 5]
    assert moving_average([1, 2, 3, 4, 5], 2) == [1, 1.5, 2.5, 3.5, 4.5]
    assert moving_average([3, 6, 9, 0], 3) == [3, 4.5, 6, 5]
    assert moving_average([2, 4], 10) == [2, 3]
    with pytest.raises(BlitextError, match="at least 1"):
        moving_average([1], 0)


def test_log_scale_only_for_positive_values_spanning_over_100x():
    assert wants_log_scale([5.0, 0.04])
    assert not wants_log_scale([5.0, 0.06])
    assert not wants_log_scale([5.0, 0.0001, -1.0])
    assert not wants_log_scale([])


def test_labels_are_folder_names_made_unique(tmp_path):
    a, b, c = tmp_path / "x" / "run", tmp_path / "y" / "run", tmp_path / "z" / "other"
    assert run_labels([a, b / "metrics.jsonl", c]) == ["x/run", "y/run", "other"]
    assert run_labels([c, c]) == ["other", "other (2)"]


def test_missing_metrics_file_names_the_path(tmp_path):
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(BlitextError, match=r"no metrics.jsonl at .*empty_run/metrics.jsonl"):
        plot_runs([tmp_path / "empty_run"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_missing_key_names_it_and_the_available_keys(two_runs, tmp_path):
    with pytest.raises(BlitextError, match=r"'lsos'.*choose keys from: lr, loss, loss_itc, sentences_per_s, temp"):
        plot_runs(two_runs, tmp_path / "x.png", keys=["loss", "lsos"])
    with pytest.raises(BlitextError, match="'samples'"):  # present, but not a number
        plot_runs(two_runs, tmp_path / "x.png", keys=["samples"])


def test_empty_and_cut_off_metrics_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n")
    with pytest.raises(BlitextError, match="is empty"):
        plot_runs([run], tmp_path / "x.png")
    # a run killed mid-write leaves half a last line: it is skipped; a bad line before it is an error
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "lo')
    assert read_records(run / "metrics.jsonl") == [{"step": 0, "loss": 1.0}]
    (run / "metrics.jsonl").write_text('{"step": 0, "lo\n{"step": 1, "loss": 1.0}\n')
    with pytest.raises(BlitextError, match="line 1 is not JSON"):
        read_records(run / "metrics.jsonl")


def test_bad_arguments(two_runs, tmp_path):
    with pytest.raises(BlitextError, match="one label per run"):
        plot_runs(two_runs, tmp_path / "x.png", labels=["only one"])
    with pytest.raises(BlitextError, match="repeat"):
        plot_runs(two_runs, tmp_path / "x.png", labels=["same", "same"])
    with pytest.raises(BlitextError, match="at least 1"):
        plot_runs(two_runs, tmp_path / "x.png", smooth=0)
    assert not os.path.exists(tmp_path / "x.png")
