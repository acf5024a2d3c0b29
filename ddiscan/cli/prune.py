"""``ddiscan prune``: the adapter with its most suspect modules removed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import InputError, printable
from ..io.jsonfile import read_json
from ..io.writer import refuse_input_as_output, refuse_same_outputs, write_atomic
from ..plot import plot_report
from ..prune import prune as prune_adapter
from ..report import SCORES
from ..rewrite import MODES
from ..select import undetermined_at_cut
from .options import FINITE, PathType, output_path, plot_path, quiet_option, say, scan_kwargs, scan_options


@click.command()
@click.argument("paths", nargs=-1, metavar="[BASE] ADAPTER", type=PathType())
@scan_options
@click.option("--top", type=click.IntRange(min=0), default=None,
              help="Prune the TOP most suspect modules: largest DDI (lowest cosine, largest E-DIEM).")
@click.option("--theta", type=FINITE, default=None,
              help="Prune every module with DDI >= THETA (cosine <= THETA, E-DIEM >= THETA).")
@click.option("--theta-norm", type=FINITE, default=None, help="Prune every module with DDI_norm >= THETA_NORM.")
@click.option("--mode", "--rewrite", "mode", type=click.Choice(MODES), default="zero", show_default=True,
              help="zero: keep every key, write zeros; drop: remove the pruned modules' tensors; "
                   "project: SafeLoRA's lora_B <- C*lora_B (--method safelora).")
@click.option("-o", "--output", type=PathType(output=True), default=None, callback=output_path,
              help="The pruned adapter: a file for a file, a directory for a PEFT directory.")
@click.option("--force", is_flag=True,
              help="Replace an existing output (a directory only if ddiscan prune wrote it).")
@click.option("--dry-run", is_flag=True, help="Print the selection and write nothing.")
@click.option("--from-report", type=PathType(), default=None,
              help="Take the scores from an earlier JSON report instead of scanning BASE.")
@click.option("--report-out", type=PathType(output=True, dir_okay=False), default=None, callback=output_path,
              help="Write the JSON report, each module marked kept or pruned.")
@click.option("--plot", type=PathType(output=True, dir_okay=False), default=None, callback=plot_path,
              help="Draw the heatmap and the sorted DDI curve with the cut marked (.png or .svg).")
@quiet_option
def prune(paths, top, theta, theta_norm, mode, output, force, dry_run, from_report, report_out, plot, quiet, **kwargs):
    """Write ADAPTER with the updates of the most suspect modules removed.

    Select by exactly one of --top, --theta, --theta-norm (ties broken by module name);
    modules are ranked by DDI, or by the --method's own score.
    With --from-report, BASE is not read; ADAPTER defaults to the report's adapter.
    """
    base, adapter = _base_and_adapter(paths, from_report)
    options = scan_kwargs(kwargs)
    if plot is not None and options["method"] != "ddi":
        raise click.UsageError("--plot shows DDI; use it with --method ddi")
    inputs = [p for p in (base, adapter, from_report, options["aligned"], options["unaligned"]) if p]
    refuse_same_outputs({"-o": output, "--report-out": report_out, "--plot": plot})
    for out in (output, report_out, plot):
        if out is not None:
            refuse_input_as_output(out, inputs, replaces_directory=out == output and Path(adapter).is_dir())
    result = prune_adapter(
        base, adapter, output, top=top, theta=theta, theta_norm=theta_norm, mode=mode, force=force,
        dry_run=dry_run, from_report=from_report,
        **({} if from_report else {"progress": not quiet and sys.stderr.isatty(), **options}),
    )
    for warning in (*(() if quiet else result.report.warnings), *_selection_warnings(result), *_cut_warnings(result)):
        say("warning", warning)
    _print_selection(result)
    if plot is not None:
        plot_report(result.report, plot, cut=(result.selection.rule, result.selection.value))
    if report_out is not None:
        write_atomic(report_out, (json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n").encode("utf-8"))
    _print_written(result, output, mode, quiet)


def _base_and_adapter(paths, from_report) -> tuple[str | None, str]:
    if from_report is not None and len(paths) <= 1:
        return None, paths[0] if paths else _report_adapter(from_report)
    if len(paths) == 2:
        return paths[0], paths[1]
    raise click.UsageError("give BASE and ADAPTER (or --from-report REPORT [ADAPTER])")


def _selection_warnings(result) -> list[str]:
    """A warning when the rule selects no module or every one, with the scores' range."""
    method = result.report.method
    field, label, _ = SCORES[method]
    finite = [getattr(m, field) for m in result.report.modules if m.finite]
    chosen = result.selection.modules
    if not finite or not (len(chosen) == len(finite) or (not chosen and result.selection.rule != "top")):
        return []
    what = "no module" if not chosen else "every module"
    spread = f"{label} ranges from {min(finite):.6g} to {max(finite):.6g}"
    if method == "ddi":
        norms = [m.ddi_norm for m in result.report.modules if m.finite]
        spread += f" (DDI_norm {min(norms):.6g} to {max(norms):.6g})"
    return [f"{result.selection.describe()} selects {what}; {spread}"]


def _cut_warnings(result) -> list[str]:
    """A warning when the selection could change within the modules' error bars."""
    unsure = undetermined_at_cut(result.selection, result.report.modules)
    if not unsure:
        return []
    names = ", ".join(m.name for m in unsure[:3]) + (", ..." if len(unsure) > 3 else "")
    return [f"the selection ({result.selection.describe()}) could change within the error bars of O: "
            f"{len(unsure)} modules ({names}) may fall on either side of the cut; rescan with --exact, or with "
            "more --krylov-iters"]


def _print_selection(result) -> None:
    field, label, _ = SCORES[result.report.method]
    rank = {m.name: i + 1 for i, m in enumerate(result.report.modules)}
    chosen = result.selection.modules
    click.echo(f"selected {len(chosen)} of {len(result.report.modules)} modules ({result.selection.describe()}):")
    for m in chosen:
        click.echo(f"  {rank[m.name]:>4}  {printable(m.name)}  {label} {getattr(m, field):.6g}")


def _print_written(result, output, mode: str, quiet: bool) -> None:
    if result.written is None:
        click.echo("dry run: nothing written")
        return
    w = result.written
    share = 100.0 * w["parameters_removed"] / w["parameters_total"] if w["parameters_total"] else 0.0
    if not quiet:
        click.echo(f"wrote {output} ({mode} mode; removed {w['parameters_removed']} of "
                   f"{w['parameters_total']} LoRA parameters, {share:.2f}%)", err=True)


def _report_adapter(path: str) -> str:
    try:
        adapter = read_json(path, "a ddiscan JSON report")["inputs"]["adapter"]["path"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a ddiscan JSON report ({exc})") from None
    if not isinstance(adapter, str):
        raise InputError(f"{path}: not a ddiscan JSON report (inputs.adapter.path is not a string)")
    return adapter
