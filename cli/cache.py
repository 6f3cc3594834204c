"""`blitext data ...` and `blitext cache ...`: preparing the embedded data sets, inspecting caches."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from blitext.cache.convert import convert_store
from blitext.cache.quantise import stored_dtype
from blitext.cli.common import default_is, parameter_default, user_errors

data_app = typer.Typer(no_args_is_help=True, help="Prepare the embedded data sets and read users' data.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check feature and prompt caches.")


# ------------------------------------------------------------------ data
@data_app.command("prepare")
@user_errors
def data_prepare_cmd(
    name: str = typer.Argument(..., help="easy-vqa | tuxpaint | fashion-mnist | moving-shapes (videos)"),
    out_root: Optional[Path] = typer.Option(None, "--out-root", help="Folder the prepared data sets are written under. " + default_is("cache/data")),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N images per split."),
    install: bool = typer.Option(False, "--install", help="Let blitext run `apt-get install` (as root) when "
                                 "tuxpaint's or fashion-mnist's Debian package is missing; without it, it "
                                 "prints the command instead."),
    withhold: Optional[list[str]] = typer.Option(None, "--withhold", help="easy-vqa: keep this colour x shape "
                                                 "combination out of the train images (repeatable, e.g. 'red circle'; "
                                                 "'default' = red circle, blue rectangle, green triangle, yellow "
                                                 "circle, gray triangle, brown rectangle)."),
    test_limit: Optional[int] = typer.Option(None, "--test-limit", help="easy-vqa: at most N test images. "
                                             + default_is("--limit")),
):
    """Write an embedded data set as standard caption JSON (+ VQA JSON) and images."""
    from blitext.console import say
    from blitext.data.prepare import prepare_dataset

    folder = prepare_dataset(name, out_root, limit=limit, install=install, withhold=tuple(withhold or ()),
                             test_limit=test_limit)
    say(f"[green]prepared[/] {name} in {folder}")


@data_app.command("list")
def data_list_cmd():
    """The embedded data sets `data prepare` knows."""
    from blitext.data.prepare import list_datasets

    for name in list_datasets():
        typer.echo(name)


# ------------------------------------------------------------------ cache
def print_cache_summary(summary: dict, project: tuple[int, ...] | None = None) -> None:
    from rich.table import Table

    from blitext.cache.manifest import load_manifest
    from blitext.cache.storage import PROJECTED_ROWS, cache_bytes, projection_line
    from blitext.console import console

    table = Table(title=f"cache {summary['path']}", show_header=False)
    producer = summary["producer"]
    rows = [
        ("kind", summary["kind"]),
        ("made by", producer.get("fingerprint") or producer.get("pformer") or str(producer)),
        ("rows", f"{summary['rows']:,}"),
        ("failed inputs", str(summary["failed"])),
        ("row shape / dtype", f"{summary['row_shape']} {summary['dtype']}" + _stored_as(summary)),
        ("shards", str(summary["shards"])),
        ("row checksums", "Fletcher-32, checked on read" if summary.get("row_checksum")
         else "none (written before rows carried checksums; `cache verify` checks the shards' sha256)"),
        ("on disk", f"{summary['bytes_on_disk'] / 2**20:,.1f} MiB ({summary['bytes_per_row']:,.0f} B/row, "
                    f"{100 * (summary['overhead'] or 0):+.2f}% vs raw)"),
    ]
    per_row = cache_bytes(summary["path"], load_manifest(summary["path"])["shards"]) / max(1, summary["rows"])
    rows += [("per row, all files", f"{per_row:,.0f} B (shards, their sidecars, the key index)"),
             ("projected", projection_line(per_row, project or PROJECTED_ROWS))]
    if "preprocessing" in producer:
        rows.insert(2, ("preprocessing", ", ".join(f"{k}={_rounded(v)}" for k, v in producer["preprocessing"].items())))
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def print_storage_plan(config) -> None:
    """extract-features --dry-run: bytes per row and the projected size, nothing written."""
    from blitext.cache.storage import PROJECTED_ROWS, human, projection_line
    from blitext.console import say
    from blitext.features.image import plan_storage

    plan = plan_storage(config)
    per_row, n = plan["bytes_per_row"], plan["images"]
    say(f"dry run: {n:,} images -> rows of {plan['row_shape']} {plan['dtype']}{_stored_as(plan)} from {plan['encoder']}")
    say(f"about {per_row:,} B/row with checksum, key and index: {human(per_row * n)} for these {n:,} images")
    say(f"projected: {projection_line(per_row, PROJECTED_ROWS)} (nothing written)")


def _stored_as(summary: dict) -> str:
    """How the rows are stored when not as the dtype readers get (an int8 store)."""
    store = stored_dtype(summary)
    return "" if store == summary["dtype"] else f", stored as {store} with a float32 scale per row"


def _rounded(value):
    if isinstance(value, (list, tuple)):
        return [round(v, 4) if isinstance(v, float) else v for v in value]
    return value


@cache_app.command("info")
@user_errors
def cache_info_cmd(
    path: Path = typer.Argument(..., help="A cache folder."),
    rows: Optional[list[int]] = typer.Option(None, "--rows", help="Project the size of N rows (repeatable). "
                                             "Default: 1,000,000, 4,000,000 and 129,000,000."),
):
    """Summary: producer, counts, shapes, bytes on disk and per row, projected sizes, failed inputs."""
    from blitext.cache.verify import cache_info

    summary = cache_info(path)
    print_cache_summary(summary, tuple(rows or ()))
    for f in summary["failures"][:10]:
        typer.echo(f"  failed: {f['key']}: {f['reason']}")


@cache_app.command("verify")
@user_errors
def cache_verify_cmd(
    path: Path = typer.Argument(..., help="A cache folder."),
    no_checksums: bool = typer.Option(False, "--no-checksums", help="Skip sha256 (faster)."),
):
    """Check every shard: opens, datasets present, sha256 and row checksums, counts, no NaN/inf."""
    from blitext.cache.verify import verify_cache
    from blitext.console import console

    report = verify_cache(path, checksums=not no_checksums)
    for problem in report.problems:
        console.print(f"[red]problem[/] {problem}", highlight=False)
    for note in report.notes:
        console.print(f"[yellow]note[/] {note}", highlight=False)
    status = "[green]ok[/]" if report.ok else f"[red]{len(report.problems)} problem(s)[/]"
    console.print(f"{path}: {report.shards_ok} shard(s) ok, {report.checked_rows:,} rows checked: {status}")
    if not report.ok:
        raise typer.Exit(2)  # as every other refusal


@cache_app.command("upgrade")
@user_errors
def cache_upgrade_cmd(path: Path = typer.Argument(..., help="A cache folder (made by any blitext).")):
    """(Re)build a cache's key index (with its rows' places, for fixed rows) and slim its manifest;
    readers then open it in O(shards) and read no shard's chunk index."""
    from blitext.cache.keyindex import upgrade
    from blitext.cache.manifest import load_manifest
    from blitext.console import say

    manifest = upgrade(path, load_manifest(path))
    say(f"[green]upgraded[/] {path}: {manifest['index']['rows']:,} keys indexed")


@cache_app.command("convert")
@user_errors
def cache_convert_cmd(
    src: Path = typer.Argument(..., help="A finished cache folder (fixed-length rows)."),
    out: Path = typer.Option(..., "--out", help="The new cache folder: new or empty (an unfinished one resumes)."),
    store: str = typer.Option(parameter_default(convert_store, "store"), "--store", show_default=True,
                              help="int8 (a float32 scale per row: half the bytes and reads of fp16; read back as "
                                   "the cache's dtype) | fp16 (rows stored as the cache's dtype)."),
):
    """Copy a finished cache with its rows in another store, without running the encoder again."""
    from blitext.console import say

    manifest = convert_store(src, out, store)
    say(f"[green]converted[/] {src} -> {out}: {manifest['count']:,} rows stored as {manifest['store']}")
