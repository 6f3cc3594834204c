"""What every `blitext` command shares: the user-error handler, --config, dataclass defaults in help."""
from __future__ import annotations

import dataclasses
import functools
import inspect
from pathlib import Path
from typing import Any, Callable

import typer
from rich.markup import escape
from typer import core as typer_core

from blitext.atomic import NO_SPACE, NOT_WRITABLE, write_failure
from blitext.errors import BlitextError

def _option_names(param) -> Text:
    """An option's names, the "--no-" form on its own line: whole words, never cut."""
    from rich.text import Text

    names = Text("\n").join(rich_utils.highlighter(", ".join(group))
                             for group in (param.opts, getattr(param, "secondary_opts", [])) if group)
    if param.required:
        names = Text.assemble((rich_utils.REQUIRED_SHORT_STRING + " ", rich_utils.STYLE_REQUIRED_SHORT), names)
    return names


def _options_panel(*, name, params, ctx, markup_mode, console) -> None:
    """typer's options panel with the names' column never cut and flags shown as flags.

    typer 0.29 gives the "--no-" form a column of its own and shrinks every column to fit 80
    characters, so `--grad-checkpointing` printed as `--grad-checkpointi…` (and `| grep` missed it);
    it also writes a flag's type as `<bool>`, as if it took a value. Here the names' and types'
    columns do not wrap, and only the help text wraps."""
    from rich.panel import Panel
    from rich.table import Table

    if not params:
        return
    table = Table(highlight=True, show_header=False, expand=True, box=None, padding=(0, 1), pad_edge=False)
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(ratio=1)
    for param in params:
        kind = None if getattr(param, "is_flag", False) else param.display_type_rich(ctx=ctx)
        table.add_row(_option_names(param), rich_utils.types_highlighter(Text(kind or "")),
                      rich_utils._get_parameter_help(param=param, ctx=ctx, markup_mode=markup_mode))
    console.print(Panel(table, border_style=rich_utils.STYLE_OPTIONS_PANEL_BORDER, title=name,
                        title_align=rich_utils.ALIGN_OPTIONS_PANEL))


if getattr(typer_core, "HAS_RICH", False):
    from rich.text import Text
    from typer import rich_utils

    rich_utils._print_options_panel = _options_panel


VQA_NORMALISE_HELP = ("Ground-truth answers: official (as the 2017 official VQA evaluation script and its copy "
                      "in LAVIS that BLIP-2 and P-Former report with, not the 2021 revision: a human answer gets the "
                      "punctuation step only, when the humans disagree) | both (normalised as the prediction).")
ConfigOpt = typer.Option(None, "--config", help="JSON or TOML file of config values (command-line options win).")


def literal(text: str) -> str:
    """Help text that reaches the --help page as written. Typer renders help strings as rich markup,
    where `[default: 5]` is a style tag and vanishes; rich's escape keeps it. Without rich
    (TYPER_USE_RICH=0) click prints help verbatim, so the text stays as it is."""
    rich_markup = getattr(typer_core, "HAS_RICH", True) and getattr(typer_core, "DEFAULT_MARKUP_MODE", "rich") == "rich"
    return escape(text) if rich_markup else text


def field_default(cls, name: str) -> Any:
    """The default of dataclass field `name` (a default_factory is called)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def shown(value: Any) -> str:
    """A default as --help writes it: True/False as on/off, anything else as str()."""
    return "on" if value is True else "off" if value is False else str(value)


def default_is(text: str) -> str:
    """`[default: text]` for help, for defaults no dataclass field holds (derived at run time)."""
    return literal(f"[default: {text}]")


def parameter_default(fn: Callable, name: str) -> Any:
    """The default of `fn`'s parameter `name`: an option whose default a library function's signature holds."""
    return inspect.signature(fn).parameters[name].default


def default_of(cls, name: str, fmt: Callable[[Any], str] = shown, **variants: type | tuple[type, str]) -> str:
    """`[default: X]` from the dataclass field cls.name, the one place the default is written.
    variants, e.g. video=VideoExtractConfig or video=(VideoDemoConfig, "clips_per_split"), add
    `; video: Y` where that config's default differs."""
    text = fmt(field_default(cls, name))
    for label, other in variants.items():
        other_cls, other_name = other if isinstance(other, tuple) else (other, name)
        value = fmt(field_default(other_cls, other_name))
        if value != text:
            text += f"; {label}: {value}"
    return default_is(text)


def generation_default(name: str) -> str:
    """`[default: ...]` of a decoding setting (GenerationSettings), which differs between captions and answers."""
    from blitext.evaluation.decoding import GenerationSettings

    caption, vqa = (getattr(GenerationSettings.for_task(task), name) for task in ("caption", "vqa"))
    flag = "--" + name.replace("_", "-")
    quote = (lambda v: f'"{v}"') if isinstance(caption, str) else \
        (lambda v: flag if v else flag.replace("--", "--no-", 1)) if isinstance(caption, bool) else str
    if name in ("prompt", "min_new_tokens", "max_new_tokens"):  # captions follow --settings
        return default_is(f"captions: the run's (--settings run), {quote(caption)} with --settings paper; "
                          f"{quote(vqa)} answers")
    return default_is(quote(caption) if caption == vqa else f"{quote(caption)} captions, {quote(vqa)} answers")
# The decoding options (and --llm), shared by eval caption / vqa and generate; their defaults are
# GenerationSettings' (blitext.evaluation.decoding), which differ between captions and answers.
LLMOpt = typer.Option(None, "--llm", help="Frozen LLM: bundled name, folder or HF id. " + default_is("the adaptor's LLM"))
PromptOpt = typer.Option(None, "--prompt", help='Text prompt ("{}" = the question). ' + generation_default("prompt"))
BeamsOpt = typer.Option(None, "--num-beams", help="Beams of beam search (1: greedy). " + generation_default("num_beams"))
MaxOpt = typer.Option(None, "--max-new-tokens", help="Most tokens generated. " + generation_default("max_new_tokens"))
MinOpt = typer.Option(None, "--min-new-tokens", help="Fewest tokens generated. " + generation_default("min_new_tokens"))
PenaltyOpt = typer.Option(None, "--length-penalty", help="Beam search's length penalty (> 0 favours longer outputs, < 0 shorter). " + generation_default("length_penalty"))
BlankOpt = typer.Option(None, "--blank-start/--no-blank-start", help="May the first new token be whitespace alone (LAVIS: yes; --no-blank-start makes an answer start with a word). " + generation_default("blank_start"))




def user_errors(fn):
    """A user's mistake is one red line and exit code 2, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from blitext.console import console

        try:
            return fn(*args, **kwargs)
        except BlitextError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except OSError as e:  # a write the code does not wrap itself: a full disk or unwritable folder
            if e.errno not in NO_SPACE | NOT_WRITABLE or not e.filename:
                raise
            folder = Path(e.filename).parent
            console.print(f"[bold red]error:[/] {write_failure(folder, e, 'run the command again')}",
                          highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: finished shards are kept; run the same command again to resume")
            raise typer.Exit(130)
    return wrapper


def write_out(path: Path, text: str) -> None:
    """An --out report, written whole or not at all (temp file, fsync, rename)."""
    from blitext.atomic import write_text, writing

    with writing(path.parent, then="run the command again"):
        write_text(path, text)


def call_with_config(fn, cls, config_file: Path | None, options: dict):
    """fn(cls's config): its defaults < the --config file < the given options (paths as strings)."""
    from blitext.config import resolve_config

    options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    return fn(resolve_config(cls, config_file, **options))


ReportToOpt = typer.Option(None, "--report-to", help="Also log every metrics.jsonl line to tensorboard (<run>/tensorboard) or wandb (offline, <run>/wandb); repeatable; optional packages. " + default_is("none"))


def _run_default(name: str) -> str:
    from blitext.loop import RunOptions

    return default_of(RunOptions, name)


PrecisionOpt = typer.Option(None, "--precision", help="auto (bf16 autocast on a GPU, fp32 on CPU) | fp32 | bf16 | fp16 (GPU, loss-scaled). " + _run_default("precision"))
GradCheckpointingOpt = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing", help="Recompute the frozen LLM's activations in the backward pass instead of keeping them (less memory, about one more LLM forward a step; P-Former, stage 2, video). " + _run_default("grad_checkpointing"))
AccumStepsOpt = typer.Option(None, "--accum-steps", help="Split each step's batch into N micro-batches and sum their gradients: the LM loss equals the whole batch's; contrastive negatives (P-Former) come from each micro-batch; not for stage 1 (ITC/ITM). " + _run_default("accum_steps"))

