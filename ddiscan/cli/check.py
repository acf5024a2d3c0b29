"""``ddiscan check``: prints what :func:`ddiscan.check` returns, and exits 1 on a failure."""

from __future__ import annotations

import sys

import click

from ..check import check as run_check
from ..errors import printable
from ..render import FORMATS
from .options import FINITE, PathType, profile_sha256_option, profiles_option, say, scan_kwargs, scan_options
from .report import titled

CHECK_FORMATS = ("terse", *FORMATS)


@click.command()
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER...", type=PathType())
@click.option("--base", type=PathType(), default=None,
              help="The base (checkpoint or profile).  [default: looked up from adapter_config.json]")
@profiles_option
@click.option("--max-ddi", type=FINITE, default=None, help="Fail when a module's DDI exceeds MAX_DDI.")
@click.option("--max-ddi-norm", type=FINITE, default=None, help="Fail when a module's DDI_norm exceeds MAX_DDI_NORM.")
@click.option("--min-cosine", type=FINITE, default=None,
              help="With --method safelora: fail when a module's cosine is below MIN_COSINE.")
@click.option("--max-ediem", type=FINITE, default=None,
              help="With --method splora: fail when a module's E-DIEM exceeds MAX_EDIEM.")
@scan_options
@click.option("--format", "fmt", type=click.Choice(CHECK_FORMATS), default="terse", show_default=True,
              help="terse: one line per failing module; the others as for report.")
@profile_sha256_option
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but failures.")
def check(adapters, base, profiles, max_ddi, max_ddi_norm, min_cosine, max_ediem, fmt, profile_sha256, quiet,
          **kwargs):
    """Check that no module of any ADAPTER exceeds a limit (for CI and pre-commit).

    Exit 0 when every module passes, 1 when any exceeds --max-ddi or --max-ddi-norm (with
    --method safelora: falls below --min-cosine; with splora: exceeds --max-ediem), one line
    each: FILE:1: MODULE: DDI VALUE > LIMIT; 2 on usage errors, 3 on bad input.
    ADAPTER may be a PEFT or MLX-LM directory, a .safetensors file, or an adapter_config.json
    (its directory is checked), as pre-commit passes them. A .safetensors file with no LoRA
    key in its header outside an adapter directory (a base, an embedding), or an
    adapter_config.json without adapter weights beside it, is passed over with a note.
    """
    result = run_check(adapters, base=base, max_ddi=max_ddi, max_ddi_norm=max_ddi_norm, min_cosine=min_cosine,
                       max_ediem=max_ediem, profiles=profiles, profile_sha256=profile_sha256,
                       **scan_kwargs(kwargs))
    for note in result.notes if not quiet else ():
        say("note", note)
    failures = [printable(failure) for failure in result.failures]
    if fmt == "terse":
        for line in failures:
            click.echo(line)
        if not quiet:
            verdict = f"{len(failures)} failing" if failures else "all pass"
            click.echo(f"ddiscan check: {len(result.reports)} adapter(s), {result.modules} modules: {verdict}",
                       err=True)
    else:
        click.echo("".join(titled(r, fmt, len(result.reports) > 1) for r in result.reports), nl=False)
        for line in failures:
            click.echo(line, err=True)
    sys.exit(0 if result.passed else 1)
