"""The ``ddiscan`` command: a thin click layer over the library.

Each command calls one library function; every ``DdiscanError`` becomes one line on
stderr and the exit code its class names (set DDISCAN_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import os
import sys

import click

from ._version import __version__
from .errors import DdiscanError
from .io.writer import refuse_input_as_output, write_atomic
from .report import FORMATS, render
from .scan import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, scan

__all__ = ["cli", "main"]


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DdiscanError as exc:
            if os.environ.get("DDISCAN_DEBUG"):
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ddiscan")
def cli():
    """Score LoRA adapters by the Directional Deviation Index (DDI), from the weights alone.

    Exit codes: 0 success, 1 check failed, 2 usage error, 3 bad input, 4 I/O failure.
    Set DDISCAN_DEBUG=1 to see the traceback behind an error.
    """


def scan_options(fn):
    """Options shared by every command that scans."""
    options = [
        click.option("--t", "t", type=click.IntRange(min=1), default=None,
                     help="Dimension t of W0's dominant subspace.  [default: the module's rank r]"),
        click.option("--t-mult", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Use t = ceil(T_MULT * r) instead; 2 is the paper's robust variant."),
        click.option("--oversample", type=click.IntRange(min=0), default=DEFAULT_OVERSAMPLE, show_default=True,
                     help="Oversampling q of the randomized range finder."),
        click.option("--power-iters", type=click.IntRange(min=0), default=DEFAULT_POWER_ITERS, show_default=True,
                     help="Power iterations of the randomized range finder."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the random test matrices (same seed, same report)."),
        click.option("--exact", is_flag=True,
                     help="Take W0's subspace from a full float64 SVD (slow; for verification)."),
        click.option("--magnitude", type=click.Choice(["bounded", "raw"]), default="bounded", show_default=True,
                     help="DDI = S*O*M_norm (bounded) or S*O*M (raw, the paper's literal Eq. 6)."),
        click.option("--alpha", type=float, default=None,
                     help="Scaling s = ALPHA / r for every module (for adapters without a config)."),
        click.option("--scaling", type=float, default=None,
                     help="Scaling s for every module (for adapters without a config)."),
        click.option("--allow-unmatched", is_flag=True,
                     help="Warn about LoRA modules with no base weight instead of failing."),
        click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
                     help="Where to compute; gpu needs the 'gpu' extra (CuPy)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _scan_kwargs(kwargs: dict) -> dict:
    keys = ("t", "t_mult", "oversample", "power_iters", "seed", "exact", "magnitude", "alpha", "scaling",
            "allow_unmatched", "device")
    return {k: kwargs.pop(k) for k in keys}


@cli.command()
@click.argument("base", type=click.Path(path_type=str))
@click.argument("adapter", type=click.Path(path_type=str))
@scan_options
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Output format.  [default: table on stdout, json with -o]")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Write the report to OUTPUT (atomically) instead of stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no warnings on stderr.")
def report(base, adapter, fmt, output, quiet, **kwargs):
    """Rank every LoRA-updated module of ADAPTER by DDI against BASE.

    BASE is a .safetensors file, a sharded checkpoint (its directory or its
    model.safetensors.index.json), or a directory holding one. ADAPTER is a .safetensors
    file or a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    """
    if output is not None:
        refuse_input_as_output(output, [base, adapter])
    result = scan(base, adapter, progress=not quiet and sys.stderr.isatty(), **_scan_kwargs(kwargs))
    if not quiet:
        for warning in result.warnings:
            click.echo(f"warning: {warning}", err=True)
    text = render(result, fmt or ("json" if output else "table"))
    if output is None:
        click.echo(text, nl=False)
    else:
        write_atomic(output, text.encode("utf-8"))
        if not quiet:
            click.echo(f"wrote {output} ({len(result.modules)} modules)", err=True)


def main():
    cli(prog_name="ddiscan")


if __name__ == "__main__":
    main()
