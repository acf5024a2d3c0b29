"""The ``ddiscan`` command: a thin click layer over the library.

Each command calls one library function; every ``DdiscanError`` becomes one line on
stderr and the exit code its class names (set DDISCAN_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ._version import __version__
from .errors import DdiscanError, InputError
from .io.writer import refuse_input_as_output, write_atomic
from .render import FORMATS, heatmap, render
from .plot import plot_report
from .prune import prune as prune_adapter
from .rewrite import MODES
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
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                     help="Where to compute; cuda needs the 'gpu' extra (CuPy)."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Threads BLAS may use.  [default: one per core]"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _scan_kwargs(kwargs: dict) -> dict:
    keys = ("t", "t_mult", "oversample", "power_iters", "seed", "exact", "magnitude", "alpha", "scaling",
            "allow_unmatched", "device", "threads")
    return {k: kwargs.pop(k) for k in keys}


@cli.command()
@click.argument("base", type=click.Path(path_type=str, readable=False))
@click.argument("adapter", type=click.Path(path_type=str, readable=False))
@scan_options
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Output format.  [default: table on stdout, json with -o]")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Write the report to OUTPUT (atomically) instead of stdout.")
@click.option("--heatmap", "heatmap_", is_flag=True, help="Also print DDI by block and module kind as a shaded grid.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Draw the heatmap and the sorted DDI curve to PLOT (.png or .svg; needs the 'plot' extra).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no warnings on stderr.")
def report(base, adapter, fmt, output, heatmap_, plot, quiet, **kwargs):
    """Rank every LoRA-updated module of ADAPTER by DDI against BASE.

    BASE is a .safetensors file, a sharded checkpoint (its directory or its
    model.safetensors.index.json), or a directory holding one. ADAPTER is a .safetensors
    file or a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    """
    for out in (output, plot):
        if out is not None:
            refuse_input_as_output(out, [base, adapter])
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
    if heatmap_:
        click.echo(heatmap(result, color=sys.stdout.isatty()), nl=False)
    if plot is not None:
        plot_report(result, plot)


@cli.command()
@click.argument("paths", nargs=-1, metavar="[BASE] ADAPTER", type=click.Path(path_type=str, readable=False))
@scan_options
@click.option("--top", type=click.IntRange(min=0), default=None, help="Prune the TOP modules with the largest DDI.")
@click.option("--theta", type=float, default=None, help="Prune every module with DDI >= THETA.")
@click.option("--theta-norm", type=float, default=None, help="Prune every module with DDI_norm >= THETA_NORM.")
@click.option("--mode", type=click.Choice(MODES), default="zero", show_default=True,
              help="zero: keep every key, write zeros; drop: remove the pruned modules' tensors.")
@click.option("-o", "--output", type=click.Path(path_type=str), default=None,
              help="The pruned adapter: a file for a file, a directory for a PEFT directory.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--dry-run", is_flag=True, help="Print the selection and write nothing.")
@click.option("--from-report", type=click.Path(path_type=str, readable=False), default=None,
              help="Take the scores from an earlier JSON report instead of scanning BASE.")
@click.option("--report-out", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Write the JSON report, each module marked kept or pruned.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Draw the heatmap and the sorted DDI curve with the cut marked (.png or .svg).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no warnings on stderr.")
def prune(paths, top, theta, theta_norm, mode, output, force, dry_run, from_report, report_out, plot, quiet, **kwargs):
    """Write ADAPTER with the updates of the highest-DDI modules removed.

    Select by exactly one of --top, --theta, --theta-norm (ties broken by module name).
    With --from-report, BASE is not read; ADAPTER defaults to the report's adapter.
    """
    if from_report is not None and len(paths) <= 1:
        base = None
        adapter = paths[0] if paths else _report_adapter(from_report)
    elif len(paths) == 2:
        base, adapter = paths
    else:
        raise click.UsageError("give BASE and ADAPTER (or --from-report REPORT [ADAPTER])")
    inputs = [p for p in (base, adapter, from_report) if p]
    for out in (output, report_out, plot):
        if out is not None:
            refuse_input_as_output(out, inputs)
    result = prune_adapter(
        base, adapter, output, top=top, theta=theta, theta_norm=theta_norm, mode=mode, force=force,
        dry_run=dry_run, from_report=from_report,
        **({} if from_report else {"progress": not quiet and sys.stderr.isatty(), **_scan_kwargs(kwargs)}),
    )
    if not quiet:
        for warning in result.report.warnings:
            click.echo(f"warning: {warning}", err=True)
    finite = [m for m in result.report.modules if m.finite]
    chosen = result.selection.modules
    if result.selection.rule != "top" and finite and len(chosen) in (0, len(finite)):
        what = "no module" if not chosen else "every module"
        click.echo(f"warning: {result.selection.describe()} selects {what}; DDI ranges from "
                   f"{min(m.ddi for m in finite):.6g} to {max(m.ddi for m in finite):.6g} "
                   f"(DDI_norm {min(m.ddi_norm for m in finite):.6g} to {max(m.ddi_norm for m in finite):.6g})",
                   err=True)
    rank = {m.name: i + 1 for i, m in enumerate(result.report.modules)}
    click.echo(f"selected {len(chosen)} of {len(result.report.modules)} modules ({result.selection.describe()}):")
    for m in chosen:
        click.echo(f"  {rank[m.name]:>4}  {m.name}  DDI {m.ddi:.6g}")
    if plot is not None:
        plot_report(result.report, plot, cut=(result.selection.rule, result.selection.value))
    if report_out is not None:
        write_atomic(report_out, (json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n").encode("utf-8"))
    if result.written is not None:
        w = result.written
        share = 100.0 * w["parameters_removed"] / w["parameters_total"] if w["parameters_total"] else 0.0
        click.echo(f"wrote {output} ({mode} mode; removed {w['parameters_removed']} of "
                   f"{w['parameters_total']} LoRA parameters, {share:.2f}%)")
    else:
        click.echo("dry run: nothing written")


def _report_adapter(path: str) -> str:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))["inputs"]["adapter"]["path"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a ddiscan JSON report ({exc})") from None


def main():
    cli(prog_name="ddiscan")


if __name__ == "__main__":
    main()
