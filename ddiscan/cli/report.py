"""``ddiscan report``: every adapter's report, on stdout or written to files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ..check import base_groups, scan_grouped
from ..errors import OutputError, UsageError, printable
from ..io.writer import refuse_input_as_output, refuse_same_outputs, write_atomic
from ..plot import plot_report
from ..render import FORMATS, heatmap, render
from ..select import undetermined
from .options import (PathType, output_path, plot_path, profile_sha256_option, profiles_option, quiet_option, say,
                      scan_kwargs, scan_options)


@click.command()
@click.argument("paths", nargs=-1, required=True, metavar="[BASE] ADAPTER...", type=PathType())
@scan_options
@profiles_option
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Output format.  [default: table on stdout, json with -o]")
@click.option("-o", "--output", type=PathType(output=True), default=None, callback=output_path,
              help="Write the report to OUTPUT (atomically) instead of stdout; with several adapters, "
                   "a directory for one JSON report each (named by the adapters' paths), "
                   "or one file with --format jsonl.")
@click.option("--heatmap", "heatmap_", is_flag=True, help="Also print DDI by block and module kind as a shaded grid.")
@click.option("--plot", type=PathType(output=True, dir_okay=False), default=None, callback=plot_path,
              help="Draw the heatmap and the sorted DDI curve to PLOT (.png or .svg; needs the 'plot' extra).")
@profile_sha256_option
@quiet_option
def report(paths, profiles, fmt, output, heatmap_, plot, profile_sha256, quiet, **kwargs):
    """Rank every LoRA-updated module of each ADAPTER by DDI against BASE.

    BASE is a .safetensors file, a sharded checkpoint (its directory or its
    model.safetensors.index.json), a directory holding one, a llama.cpp .gguf file
    (pip install 'ddiscan[gguf]'), or a base profile (.ddiprofile). ADAPTER is a
    .safetensors file, a PEFT adapter directory (adapter_config.json +
    adapter_model.safetensors) or an MLX-LM one (adapter_config.json +
    adapters.safetensors). With several adapters each base tensor is read once for all of
    them. With a single ADAPTER and no BASE, the base named by its adapter_config.json is
    looked up offline (local path, Hugging Face cache, --profiles).
    """
    base, adapters = (None, list(paths)) if len(paths) == 1 else (paths[0], list(paths[1:]))
    options = scan_kwargs(kwargs)
    fmt = _refuse_combinations(len(adapters) > 1, fmt, output, heatmap_, plot, options["method"])
    several = len(adapters) > 1
    targets = _report_files(output, list(dict.fromkeys(adapters))) if several and output and fmt == "json" else {}
    refuse_same_outputs({"-o": None if targets else output, "--plot": plot})
    inputs = [p for p in (base, *adapters, options["aligned"], options["unaligned"]) if p]
    for out in filter(None, (output, plot, *targets.values())):
        refuse_input_as_output(out, inputs)
    reports = scan_reports(base, adapters, profiles, quiet, profile_sha256=profile_sha256,
                           progress=not quiet and sys.stderr.isatty(), **options)
    _emit(reports, fmt, several, output, targets, quiet)
    for result in reports if heatmap_ else ():
        click.echo(titled(result, "heatmap", several), nl=False)
    if plot is not None:
        plot_report(reports[0], plot)


def _emit(reports: list, fmt: str, several: bool, output, targets: dict, quiet: bool) -> None:
    """The reports on stdout, in one file ``output``, or one in each of ``targets``."""
    if targets:
        _write_reports(output, targets.values(), reports)
        _wrote(quiet, f"{_count(len(reports), 'report')} to {output}")
        return
    text = "".join(titled(r, fmt, several) for r in reports)
    if output is None:
        click.echo(text, nl=False)
    else:
        write_atomic(output, text.encode("utf-8"))
        _wrote(quiet, f"{output} ({_count(sum(len(r.modules) for r in reports), 'module')})")


def _refuse_combinations(several: bool, fmt, output, heatmap_, plot, method) -> str:
    """The output format, once the options that cannot go together are refused."""
    if (heatmap_ or plot) and method != "ddi":
        raise click.UsageError("--heatmap and --plot show DDI; use them with --method ddi")
    if several and plot is not None:
        raise click.UsageError("--plot draws one adapter's report; give one ADAPTER")
    if several and output is not None and fmt not in (None, "json", "jsonl"):
        raise click.UsageError("with several adapters, -o takes --format json (a directory) or jsonl (one file)")
    return fmt or ("json" if output else "table")


def _wrote(quiet: bool, what: str) -> None:
    if not quiet:
        click.echo(f"wrote {what}", err=True)


def scan_reports(base, adapters, profiles, quiet, *, profile_sha256=None, **options) -> list:
    """Reports in the order the adapters were given, each base read once for its group;
    unless ``quiet``, where each base was found and the scans' warnings on stderr."""
    groups, located = base_groups(base, adapters, profiles)
    for adapter, found in zip(adapters, located) if not quiet else ():
        for warning in found.warnings:
            say("warning", warning)
        click.echo(printable(f"{adapter}: base {found.detail}"), err=True)
    reports, _ = scan_grouped(groups, profile_sha256=profile_sha256, **options)
    for result in reports if not quiet else ():
        prefix = f"{result.inputs['adapter']['path']}: " if len(reports) > 1 else ""
        for warning in result.warnings:
            say("warning", f"{prefix}{warning}")
        unsure = undetermined(result.modules) if result.method == "ddi" else []
        if unsure:
            say("warning", f"{prefix}{len(unsure)} modules' O is not precise enough to rank them (their DDI error "
                           "bars overlap a neighbour's; marked ? in the table): rescan with --exact, or with more "
                           "--krylov-iters")
    return reports


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _report_files(output: str, adapters: list[str]) -> dict[str, Path]:
    """Each adapter's JSON report in the directory ``output``, named by the last components
    of the adapter's absolute path joined by "-" (a file's suffix dropped), as few as make
    every name unique: x/lora and y/lora give x-lora.json and y-lora.json. Names that
    collide at every depth are a UsageError, raised before anything is written."""
    if Path(output).exists() and not Path(output).is_dir():
        raise UsageError(f"{output}: exists and is not a directory (with several adapters, -o names a directory)")
    parts = {a: _path_parts(a) for a in adapters}
    depths = range(1, max(1, *(len(p) for p in parts.values())) + 1)
    choices = [{a: "-".join(p[-depth:]) + ".json" for a, p in parts.items()} for depth in depths]
    for names in choices:
        if len(set(names.values())) == len(names):
            return {a: Path(output) / name for a, name in names.items()}
    raise _clash(output, choices)


def _clash(output: str, choices: list[dict]) -> UsageError:
    deepest = list(choices[-1].values())
    clash = next(n for n in deepest if deepest.count(n) > 1)
    first, second = [a for a, n in choices[-1].items() if n == clash][:2]
    return UsageError(f"{first} and {second}: both reports would be {Path(output) / choices[0][first]}; "
                      "give each adapter once")


def _path_parts(adapter: str) -> list[str]:
    path = Path(os.path.abspath(adapter))
    parts = list(path.parts[1:])
    if parts and path.is_file():
        parts[-1] = path.stem
    return parts


def _write_reports(output: str, targets, reports) -> None:
    """One JSON report per target in the directory ``output``, created if need be (and
    removed again if a write fails before any report is in it)."""
    created = not os.path.lexists(output)
    try:
        Path(output).mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{output}: cannot create the directory ({exc.strerror or exc})") from None
    try:
        for target, result in zip(targets, reports):
            write_atomic(target, render(result, "json").encode("utf-8"))
    except BaseException:
        if created:
            try:
                os.rmdir(output)  # only if still empty: reports written before the failure stay
            except OSError:
                pass
        raise


def titled(result, fmt: str, several: bool) -> str:
    """One report in ``fmt``; with several adapters, under its adapter's name."""
    text = heatmap(result, color=sys.stdout.isatty()) if fmt == "heatmap" else render(result, fmt)
    if several and fmt in ("table", "markdown", "heatmap"):
        return f"== {printable(result.inputs['adapter']['path'])} ==\n{text}\n"
    return text
