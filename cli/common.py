"""What every `blitext` command shares: the user-error handler, --config, dataclass defaults in help."""
from __future__ import annotations

import functools

import typer

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
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: finished shards are kept; run the same command again to resume")
            raise typer.Exit(130)
    return wrapper
