"""``ddiscan audit``: a collection of adapters into one result database, or (with no PATH)
the database's answers: the top adapters by max DDI, the HTML page."""

from __future__ import annotations

import sys

import click

from ..auditing.answers import TOP_FORMATS, render_top, summary
from ..auditing.db import Database
from ..auditing.run import DEFAULT_DB, audit as run_audit
from .options import PathType, output_path, profiles_option, quiet_option, say, scan_kwargs, scan_options

DEFAULT_TOP = 10


@click.command()
@click.argument("paths", nargs=-1, metavar="[PATH]...", type=PathType())
@click.option("--base", type=PathType(), default=None,
              help="The base of every adapter (checkpoint or profile).  [default: each adapter's, looked up offline]")
@click.option("--db", type=PathType(output=True, dir_okay=False), default=DEFAULT_DB, show_default=True,
              callback=output_path, help="The SQLite result database (created if missing).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes of the local Dask cluster.  [default: one per core]")
@click.option("--scheduler", metavar="ADDRESS", default=None,
              help="Run on the Dask scheduler at ADDRESS (tcp://host:port) instead of a local cluster.")
@click.option("--retry-errors", is_flag=True, help="Scan the adapters whose rows are errors again.")
@click.option("--max-t", type=click.IntRange(min=1), default=64, show_default=True,
              help="Widest subspace of the base profiles the audit builds.")
@profiles_option
@scan_options
@click.option("--top", type=click.IntRange(min=0), default=None,
              help=f"Print the TOP adapters by max DDI.  [default: {DEFAULT_TOP}]")
@click.option("--format", "fmt", type=click.Choice(TOP_FORMATS), default="table", show_default=True,
              help="Format of the top adapters.")
@click.option("--html", type=PathType(output=True, dir_okay=False), default=None, callback=output_path,
              help="Write the database as one self-contained HTML page to HTML.")
@quiet_option
def audit(paths, base, db, workers, scheduler, retry_errors, max_t, profiles, top, fmt, html, quiet, **kwargs):
    """Score every adapter among PATH... into one SQLite database, on a Dask cluster.

    PATH is an adapter (.safetensors file or PEFT directory), a directory tree searched
    for adapters (a Hugging Face cache among them), or @LIST, a file of paths, one per
    line. Each base is read once: its profile is built (or reused) on the cluster, then
    one task per adapter scores it. Adapters already in --db (same content, base and
    options) are skipped; a broken adapter becomes an error row. With no PATH, --db is
    only queried: the top adapters by max DDI, and --html.
    """
    options = scan_kwargs(kwargs)
    if workers is not None and scheduler is not None:
        raise click.UsageError("give --workers or --scheduler, not both")
    if not paths and top is None and html is None:
        raise click.UsageError("give PATH... to audit, or --top/--html to query --db")
    if paths:
        result = run_audit(list(paths), base=base, db=db, workers=workers, scheduler=scheduler,
                           retry_errors=retry_errors, max_t=max_t, profiles=profiles,
                           progress=not quiet and sys.stderr.isatty(), **options)
        for note in result.notes if not quiet else ():
            say("note", note)
    with Database(db, create=bool(paths)) as database:
        if paths and not quiet:
            click.echo(summary(result, database.counts()), err=True)
        click.echo(render_top(database.top(DEFAULT_TOP if top is None else top), fmt), nl=False)
    if html is not None:
        from ..auditing.html import write_html

        write_html(db, html)
        if not quiet:
            click.echo(f"wrote {html}", err=True)
