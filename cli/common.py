"""What every `blitext` command shares: the user-error handler, --config, dataclass defaults in help."""
from __future__ import annotations

import functools
from pathlib import Path

import typer

from blitext.atomic import NO_SPACE, NOT_WRITABLE, write_failure
from blitext.errors import BlitextError

ConfigOpt = typer.Option(None, "--config", help="JSON or TOML file of config values (command-line options win).")


def default_of(cls, name: str) -> str:
    import dataclasses

    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f"[default: {field.default}]"


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
