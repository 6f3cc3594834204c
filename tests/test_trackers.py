"""--report-to: every metrics.jsonl line also reaches TensorBoard (real event files) or W&B (offline;
a stand-in module records the calls, since wandb is not installed here); resume keeps one value a step."""
from __future__ import annotations

import sys
import types

import pytest
from typer.testing import CliRunner

from blitext.adapter.image import AdapterLoop, train_adapter
from blitext.cli.main import app
from blitext.errors import BlitextError
from blitext.training import read_metrics
from adapter_world import config, stop_at_step, world  # noqa: F401


def scalars(folder, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def test_tensorboard_gets_every_metrics_line_once_across_a_resume(tmp_path, world, monkeypatch):  # noqa: F811
    pytest.importorskip("tensorboard")
    run = tmp_path / "tb"
    real = stop_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(config(world, run, max_steps=6, report_to=["tensorboard"]))
    monkeypatch.setattr(AdapterLoop, "train_step", real)
    train_adapter(config(world, run, max_steps=6, report_to="tensorboard", resume="latest"))
    lines = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    logged = scalars(run / "tensorboard", "loss")
    assert sorted(logged) == [m["step"] for m in lines] == list(range(6))
    assert all(logged[m["step"]] == pytest.approx(m["loss"], rel=1e-6) for m in lines)
    assert set(scalars(run / "tensorboard", "itc")) == set(range(6))


class FakeWandb(types.ModuleType):
    """What blitext calls on wandb: init (offline, with an id to resume), log with a step, finish."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Session:
            def log(self, values, step):
                fake.logged.append((step, values))

            def finish(self):
                fake.finished += 1
        return Session()


def test_wandb_runs_offline_and_resumes_the_same_run(tmp_path, world, monkeypatch):  # noqa: F811
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "wb"
    real = stop_at_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(config(world, run, max_steps=4, report_to=["wandb"]))
    monkeypatch.setattr(AdapterLoop, "train_step", real)
    train_adapter(config(world, run, max_steps=4, report_to=["wandb"], resume="latest"))
    lines = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert [step for step, _ in fake.logged] == [m["step"] for m in lines] == [0, 1, 2, 3]
    assert all(values["loss"] == m["loss"] for (_, values), m in zip(fake.logged, lines))
    first, resumed = fake.inits
    assert first["mode"] == "offline" and first["dir"] == str(run) and first["config"]["max_steps"] == 4
    assert resumed["id"] == first["id"] and resumed["resume"] == "allow" and fake.finished >= 1


def test_unknown_or_missing_trackers_are_one_line_errors(tmp_path, world, monkeypatch):  # noqa: F811
    with pytest.raises(BlitextError, match="--report-to 'mlflow'"):
        config(world, tmp_path / "x", report_to=["mlflow"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(BlitextError, match="pip install wandb"):
        config(world, tmp_path / "x", report_to=["wandb"])
    result = CliRunner().invoke(app, ["train-adapter", "--features", str(world["features"]), "--report-to", "wandb"])
    assert result.exit_code == 2 and "pip install wandb" in result.output
