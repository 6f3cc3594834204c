"""`blitext <command> --help` shows every option's default, read from the phase's config dataclass.

Rich reads `[default: 5]` in a help string as a markup tag and drops it, so a default the help text
carries must reach the page as written; these tests render the real pages (wide, no wrapping
surprises) and compare them with the dataclass fields.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import typer
from rich.text import Text
from typer.testing import CliRunner

from blitext.adapter.image import AdapterConfig
from blitext.adapter.video import VideoAdapterConfig
from blitext.cli.main import app
from blitext.evaluation.evaluate import EvalConfig
from blitext.evaluation.decoding import GenerationSettings
from blitext.evaluation.generate import GenerateConfig
from blitext.evaluation.score import ScoreConfig
from blitext.features.image import ExtractConfig
from blitext.features.imported import ImportConfig
from blitext.features.video import VideoExtractConfig
from blitext.pformer.prompts import BuildPromptsConfig
from blitext.pformer.train import PFormerConfig
from blitext.recipes.ablate import AblateConfig
from blitext.recipes.demo import DemoConfig
from blitext.recipes.recipe import Recipe
from blitext.recipes.demo_video import VideoDemoConfig

WIDE = {"COLUMNS": "200"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
ROW = re.compile(r"│ {1,6}(?:\* +)?(--[\w-]+)")  # an option's first line in the table; wrapped lines sit further right

# The config each command resolves its options into.
CONFIGS = {
    "extract-features": ExtractConfig, "import-features": ImportConfig, "train-pformer": PFormerConfig,
    "build-prompts": BuildPromptsConfig, "train-adapter": AdapterConfig, "generate": GenerateConfig,
    "eval caption": EvalConfig, "eval vqa": EvalConfig, "eval retrieval": EvalConfig, "ablate": AblateConfig,
    "demo": DemoConfig, "score caption": ScoreConfig, "score vqa": ScoreConfig,
}


def commands(group=None, path: tuple[str, ...] = ()):
    """Every command of the app as (("eval", "vqa"), its click command); typer builds them on its own
    copy of click, so groups and options are told apart by their attributes."""
    group = group or typer.main.get_command(app)
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name), command


def is_option(param) -> bool:
    return param.param_type_name == "option"


ALL = {" ".join(path): command for path, command in commands()}
SECONDARY = {name for command in ALL.values() for p in command.params for name in getattr(p, "secondary_opts", [])}


def field_default(cls, name: str):
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def shown(value) -> str:
    return "on" if value is True else "off" if value is False else str(value)


def default(cls, name: str, video=None, video_name: str | None = None) -> str:
    """The `[default: ...]` expected for field `name` of cls (and, where it differs, of the video config)."""
    text = shown(field_default(cls, name))
    if video is not None:
        other = shown(field_default(video, video_name or name))
        if other != text:
            text += f"; video: {other}"
    return f"[default: {text}]"


_pages: dict[str, str] = {}


def page(command: str) -> str:
    if command not in _pages:
        result = CliRunner().invoke(app, [*command.split(), "--help"], env=WIDE)
        assert result.exit_code == 0, result.output
        _pages[command] = ANSI.sub("", result.output)
    return _pages[command]


def rows(command: str) -> dict[str, str]:
    """The option table of a --help page: {"--opt": "the row's text, wrapped lines joined"}."""
    found: dict[str, list[str]] = {}
    current = None
    for line in page(command).splitlines():
        if not line.startswith("│"):
            current = None
            continue
        m = ROW.match(line)
        if m and m.group(1) not in SECONDARY:  # a "--no-" form sits under its option, in the same row
            current = found.setdefault(m.group(1), [])
        if current is not None:
            current.append(line)
    return {opt: " ".join(" ".join(lines).replace("│", " ").split()) for opt, lines in found.items()}


@pytest.mark.parametrize("command", sorted(ALL))
def test_every_help_page_renders(command):
    options = [p.opts[0] for p in ALL[command].params if is_option(p)]
    assert set(options) <= set(rows(command)), page(command)


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_option_with_a_config_default_shows_it(command):
    """Each option named after a field of the command's config shows that field's default (the first
    value of the row's `[default: ...]`; a video variant may follow after `;`)."""
    cls = CONFIGS[command]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    table = rows(command)
    checked = 0
    for param in ALL[command].params:
        f = fields.get(param.name)
        if not is_option(param) or f is None or f.default in (None, "", dataclasses.MISSING) \
                or isinstance(f.default, bool):
            continue
        row = table[param.opts[0]]
        assert re.search(re.escape(f"[default: {f.default}") + r"[];]", row), (command, row)
        checked += 1
    assert checked  # the test reads the options it means to


EXPECTED = {
    "extract-features": {
        "--data": default(ExtractConfig, "data", VideoExtractConfig),
        "--vision-encoder": default(ExtractConfig, "vision_encoder", VideoExtractConfig),
        "--batch-size": default(ExtractConfig, "batch_size", VideoExtractConfig),
        "--shard-size": default(ExtractConfig, "shard_size", VideoExtractConfig),
        "--precision": default(ExtractConfig, "precision", VideoExtractConfig),
        "--fps": default(VideoExtractConfig, "fps"),
        "--segment-frames": default(VideoExtractConfig, "segment_frames"),
        "--max-segments": default(VideoExtractConfig, "max_segments"),
        "--frames-per-segment": default(VideoExtractConfig, "frames_per_segment"),
    },
    "import-features": {
        "--encoder": default(ImportConfig, "encoder"),
        "--max-segments": default(ImportConfig, "max_segments"),
        "--shard-size": default(ImportConfig, "shard_size"),
    },
    "train-pformer": {
        "--llm": default(PFormerConfig, "llm"),
        "--n-prompt": default(PFormerConfig, "n_prompt"),
        "--batch-size": default(PFormerConfig, "batch_size"),
        "--lr": default(PFormerConfig, "lr"),
        "--seed": default(PFormerConfig, "seed"),
        "--contrast": default(PFormerConfig, "contrast"),
        "--device": default(PFormerConfig, "device"),
    },
    "build-prompts": {
        "--store": default(BuildPromptsConfig, "store"),
        "--shard-size": default(BuildPromptsConfig, "shard_size"),
    },
    "train-adapter": {
        "--stage": default(AdapterConfig, "stage"),
        "--batch-size": default(AdapterConfig, "batch_size", VideoAdapterConfig),
        "--epochs": default(AdapterConfig, "epochs", VideoAdapterConfig),
        "--lr": default(AdapterConfig, "lr", VideoAdapterConfig),
        "--schedule": default(VideoAdapterConfig, "schedule"),
        "--align-epochs": default(VideoAdapterConfig, "align_epochs"),
        "--cross-attention-frequency": default(AdapterConfig, "cross_attention_frequency"),
        "--warmup-steps": f"; video: {field_default(VideoAdapterConfig, 'warmup_steps')}]",
        "--w-align": f"; video: {field_default(VideoAdapterConfig, 'w_align')}]",
    },
    "generate": {
        "--batch-size": default(GenerateConfig, "batch_size"),
        "--num-beams": f"[default: {GenerationSettings().num_beams}]",
        "--max-new-tokens": f"[default: captions: the run's (--settings run), {GenerationSettings().max_new_tokens} with "
                            f"--settings paper; {GenerationSettings.for_task('vqa').max_new_tokens} answers]",
        "--prompt": f'[default: captions: the run\'s (--settings run), "{GenerationSettings().prompt}" with --settings paper; '
                    f'"{GenerationSettings.for_task("vqa").prompt}" answers]',
        "--settings": default(GenerateConfig, "settings"),
        "--llm": "[default: the adaptor's LLM]",
    },
    "eval caption": {
        "--batch-size": default(EvalConfig, "batch_size"),
        "--device": default(EvalConfig, "device"),
        "--meteor": default(EvalConfig, "meteor"),
        "--settings": default(EvalConfig, "settings"),
        "--num-beams": f"[default: {GenerationSettings().num_beams}]",
        "--out": "[default: <run>/eval/<task>-<data name>]",
    },
    "eval vqa": {
        "--batch-size": default(EvalConfig, "batch_size"),
        "--min-new-tokens": f"[default: captions: the run's (--settings run), {GenerationSettings().min_new_tokens} with "
                            f"--settings paper; {GenerationSettings.for_task('vqa').min_new_tokens} answers]",
        "--captions": "[default: captions_<split>.json beside the questions file",
    },
    "eval retrieval": {
        "--k": default(EvalConfig, "k"),
    },
    "ablate": {
        "--data": default(AblateConfig, "data"),
        "--limit": default(AblateConfig, "images_per_split"),
        "--pformer-steps": default(Recipe, "pformer_steps"),
        "--stage1-lr": default(Recipe, "stage1_lr"),
        "--stage2-lr": default(Recipe, "stage2_lr"),
        "--seeds": "[default: " + " ".join(map(str, AblateConfig().seeds)) + "]",
        "--scale": default(AblateConfig, "scale"),
        "--text-sizes": default(AblateConfig, "text_sizes"),
        "--grid": '[default: "' + ";".join(f"{w1:g},{w2:g}" for w1, w2 in AblateConfig().grid) + '"',
    },
    "demo": {
        "--limit": default(DemoConfig, "images_per_split", VideoDemoConfig, "clips_per_split"),
        "--scale": default(DemoConfig, "scale"),
    },
    "data prepare": {
        "--out-root": "[default: cache/data]",
        "--test-limit": "[default: --limit]",
    },
    "check-prompts": {
        "--limit": "[default: 256]",  # typer's own, from the parameter's default
        "--llm": "[default: the one the prompts were made for]",
    },
    "plot": {
        "--keys": "[default: every loss term]",
    },
}


@pytest.mark.parametrize("command", sorted(EXPECTED))
def test_help_shows_the_defaults(command):
    table = rows(command)
    for option, text in EXPECTED[command].items():
        assert text in table[option], (command, option, table[option])


def test_no_help_text_is_eaten_as_rich_markup():
    """What typer hands to rich.Text.from_markup comes out whole (brackets escaped where meant literally)."""
    for command, cmd in ALL.items():
        texts = [cmd.help or ""] + [p.help or "" for p in cmd.params if getattr(p, "help", None)]
        for text in texts:
            assert Text.from_markup(text).plain == text.replace("\\[", "["), (command, text)


def _blitext(*args: str, **env: str) -> str:
    run = subprocess.run([sys.executable, "-m", "blitext", *args], capture_output=True, text=True,
                         env={**os.environ, **WIDE, "TERMINAL_WIDTH": "200", **env}, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return " ".join(ANSI.sub("", run.stdout).replace("│", " ").split())


def test_python_m_blitext_help():
    top = _blitext("--help")
    assert "train-pformer" in top and "eval" in top
    assert default(Recipe, "stage1_lr") in _blitext("ablate", "--help")


def test_plain_help_without_rich_shows_no_escapes():
    """TYPER_USE_RICH=0: click's plain formatter prints help strings as written, so no `\\[` there."""
    text = _blitext("train-pformer", "--help", TYPER_USE_RICH="0")
    assert default(PFormerConfig, "lr") in text and "\\[" not in text


def option_names(command) -> list[str]:
    return [name for p in command.params if is_option(p) for name in (*p.opts, *p.secondary_opts)]


def narrow_page(command: str, env: dict[str, str]) -> str:
    result = CliRunner().invoke(app, [*command.split(), "--help"], env=env)
    assert result.exit_code == 0, result.output
    return ANSI.sub("", result.output)


@pytest.mark.parametrize("env", [{"COLUMNS": "80"}, {"COLUMNS": None, "TERMINAL_WIDTH": None}], ids=["80-columns", "piped"])
def test_no_option_name_is_cut(env):
    """At 80 columns, or piped (rich's 80 by default), every option's names are whole words on the page,
    so `blitext train-adapter --help | grep grad` finds --grad-checkpointing."""
    cut = []
    for command, cmd in ALL.items():
        text = narrow_page(command, env)
        assert max(map(len, text.splitlines())) <= 80, (command, text)
        words = set(re.findall(r"--[\w-]+(?!…)\b", text))
        cut += [f"{command} {name}" for name in option_names(cmd) if name not in words]
    assert not cut, "option names cut on the --help page: " + ", ".join(cut)


def test_piped_help_greps_the_long_option_names():
    out = subprocess.run([sys.executable, "-m", "blitext", "train-adapter", "--help"], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")},
                         timeout=300).stdout
    grad = [line for line in out.splitlines() if "grad-checkpointing" in line]
    assert any("--grad-checkpointing " in line for line in grad) and any("--no-grad-checkpointing" in line for line in grad)
    assert "--cross-attention-frequency " in out


def test_flags_show_as_flags():
    """A flag takes no value, so its row names no type (typer 0.29 wrote `--smoke <bool>`)."""
    shown_as_values = [command for command in ALL if "<bool>" in page(command)]
    assert not shown_as_values
    assert "<bool>" not in narrow_page("", {"COLUMNS": "80"})  # the top level's --help and --version
    assert re.search(r"│ --smoke +Every phase", page("demo")), page("demo")


def test_every_option_has_help_text():
    """Not just its default: every option says what it is."""
    bare = [f"{command} {p.opts[0]}" for command, cmd in ALL.items() for p in cmd.params if is_option(p)
            and not re.sub(r"\\?\[default:[^]]*\]", "", p.help or "").strip()]
    assert not bare, "options with no help text: " + ", ".join(bare)


def test_vqa_normalise_names_the_script_it_equals():
    for command in ("eval vqa", "score vqa"):
        row = rows(command)["--vqa-normalise"]
        assert "2017 official VQA evaluation script" in row and "LAVIS" in row and "not the 2021 revision" in row, row


def test_version():
    import blitext

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"blitext {blitext.__version__}"


def test_device_cuda_without_cuda_is_one_line(monkeypatch, tmp_path):
    """Every command resolves --device in one place (blitext.distributed.pick_device), so a CPU-only torch
    answers `--device cuda` in one line before any model loads, whichever command asked."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "a.txt").write_text("a red circle\n")
    for args in (["extract-features", "--data", str(tmp_path), "--out", str(tmp_path / "f")],
                 ["train-pformer", "--text", str(tmp_path / "a.txt"), "--out", str(tmp_path / "p")]):
        result = CliRunner().invoke(app, [*args, "--device", "cuda"], env=WIDE)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert "--device cuda" in lines[0] and "--device cpu" in lines[0] and "Traceback" not in result.output
