"""The ``ddiscan`` command: a thin click layer over the library.

Each command calls one library function; every ``DdiscanError`` becomes one line on
stderr and the exit code its class names (set DDISCAN_DEBUG=1 for the traceback). Usage
errors are one line too (exit 2), an interrupt is "Error: interrupted" (exit 130), and any
other exception, a bug, is "Error: internal error: ... (please report)" (exit 70). Every
message and every name printed goes through :func:`ddiscan.errors.printable`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from ._version import __version__
from .errors import DdiscanError, InputError, OutputError, UsageError, printable
from .io.jsonfile import read_json
from .io.reader import SafetensorsFile, collecting_inputs
from .io.writer import refuse_input_as_output, refuse_same_outputs, write_atomic
from .locate import find_base
from .lora import adapter_kind
from .methods import parse_components
from .options import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, OptionError, ScanOptions
from .plot import check_plot, plot_report
from .profile import DEFAULT_EXCLUDE, Profile, build_profile, is_profile
from .prune import prune as prune_adapter
from .render import FORMATS, heatmap, render
from .report import SCORES
from .rewrite import MODES
from .scan import scan_many

__all__ = ["cli", "main"]


# how the command line shows each library parameter in a message: as its flag
FLAGS = {name: "--" + name.replace("_", "-") for name in ScanOptions.names()}
INTERRUPTED, INTERNAL, BROKEN_PIPE = 130, 70, 141  # 141 = 128 + SIGPIPE, as a shell reports it
# click's own exits, and its help for a bare command (click 8.2+), are not errors
_CLICK_PASSES = tuple(getattr(click.exceptions, name) for name in ("Exit", "Abort", "NoArgsIsHelpError")
                      if hasattr(click.exceptions, name))


def _fail(message: str, code: int):
    click.echo(f"Error: {printable(message)}", err=True)
    sys.exit(code)


@contextmanager
def _one_line_errors():
    """Every failure as one line on stderr and its exit code (the README's table); with
    DDISCAN_DEBUG set, ddiscan's own errors and bugs raise with their traceback."""
    try:
        yield
    except _CLICK_PASSES:
        raise
    except click.ClickException as exc:  # usage errors: click prints four lines, we print one
        _fail(exc.format_message(), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", INTERRUPTED)
    except BrokenPipeError:  # stdout closed early (`ddiscan report ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        sys.exit(BROKEN_PIPE)
    except DdiscanError as exc:
        if os.environ.get("DDISCAN_DEBUG"):
            raise
        _fail(exc.render(FLAGS) if isinstance(exc, OptionError) else str(exc), exc.exit_code)
    except Exception as exc:  # the last line of defence: a bug, not a way to report bad input
        if os.environ.get("DDISCAN_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (please report)", INTERNAL)


class _Group(click.Group):
    def make_context(self, *args, **kwargs):
        with _one_line_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_errors(), collecting_inputs():  # every file read: no output may replace one
            return super().invoke(ctx)


def _say(prefix: str, message: str) -> None:
    """A ``warning:`` or ``note:`` line on stderr, escaped (names come from files)."""
    click.echo(f"{prefix}: {printable(message)}", err=True)


class _Finite(click.FloatRange):
    """A float option that must be a finite number: nan compares false with everything,
    so a limit of nan would pass every module, and inf would switch a limit off."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE = _Finite()


class _Path(click.Path):
    """A path argument or option that the system can look up: one it refuses to (a name
    too long, a directory that is not searchable) is the one-line input (or, for an
    ``output``, I/O) error; a path that does not exist is left to the command."""

    def __init__(self, *, output: bool = False, **kwargs):
        super().__init__(path_type=str, readable=False, **kwargs)
        self.output = output

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        try:
            os.stat(value)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:
            error, what = (OutputError, "cannot write") if self.output else (InputError, "cannot read")
            raise error(f"{value}: {what} ({exc.strerror or exc})") from None
        return value


MAX_THREADS = 4096


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ddiscan")
def cli():
    """Score LoRA adapters by the Directional Deviation Index (DDI), from the weights alone.

    Exit codes: 0 success, 1 check failed, 2 usage error, 3 bad input, 4 I/O failure,
    70 internal error, 130 interrupted. Set DDISCAN_DEBUG=1 to see the traceback behind an error.
    """


def _components(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_components(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _output(ctx, param, value):
    """An output path, checked while the options are parsed, before any work or write:
    the directory it goes into must exist."""
    if value is not None and not Path(value).parent.is_dir():
        raise OutputError(f"{value}: cannot write (no directory {Path(value).parent})")
    return value


def _plot_output(ctx, param, value):
    """A --plot picture: an output path (see _output) of a known format, with matplotlib installed."""
    if _output(ctx, param, value) is not None:
        check_plot(value)
    return value


def scan_options(fn):
    """Options shared by every command that scans."""
    options = [
        click.option("--t", "t", type=click.IntRange(min=1), default=None,
                     help="Dimension t of W0's dominant subspace.  [default: the module's rank r]"),
        click.option("--t-mult", type=_Finite(min=0, min_open=True), default=None,
                     help="Use t = ceil(T_MULT * r) instead; 2 is the paper's robust variant."),
        click.option("--oversample", type=click.IntRange(min=0), default=DEFAULT_OVERSAMPLE, show_default=True,
                     help="Oversampling q of the randomized range finder."),
        click.option("--power-iters", type=click.IntRange(min=0), default=DEFAULT_POWER_ITERS, show_default=True,
                     help="Power iterations of the randomized range finder."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Seed of the random test matrices (same seed, same report)."),
        click.option("--exact", is_flag=True,
                     help="Take W0's subspace from a full float64 SVD (slow; for verification)."),
        click.option("--magnitude", type=click.Choice(["bounded", "raw"]), default="bounded", show_default=True,
                     help="DDI = S*O*M_norm (bounded) or S*O*M (raw, the paper's literal Eq. 6)."),
        click.option("--alpha", type=FINITE, default=None,
                     help="Scaling s = ALPHA / r for every module (for adapters without a config)."),
        click.option("--scaling", type=FINITE, default=None,
                     help="Scaling s for every module (for adapters without a config)."),
        click.option("--allow-unmatched", is_flag=True,
                     help="Warn about LoRA modules with no base weight instead of failing."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                     help="Where to compute; cuda needs the 'gpu' extra (CuPy)."),
        click.option("--threads", type=click.IntRange(min=1, max=MAX_THREADS), default=None,
                     help=f"Threads BLAS may use (at most {MAX_THREADS}).  [default: one per core]"),
        click.option("--method", type=click.Choice(["ddi", "safelora", "splora"]), default="ddi", show_default=True,
                     help="DDI, SafeLoRA's cosine, or SPLoRA's E-DIEM (the last two need --aligned/--unaligned)."),
        click.option("--aligned", type=_Path(), default=None,
                     help="The aligned (chat) checkpoint, for safelora/splora."),
        click.option("--unaligned", type=_Path(), default=None,
                     help="Its unaligned pretrained twin, for safelora/splora."),
        click.option("--components", default=None, callback=_components,
                     help="DDI ablation: score by the product of a subset of S,O,M (e.g. S,O)."),
        click.option("--samples", type=click.IntRange(min=2), default=32, show_default=True,
                     help="Reference rotations of SPLoRA's E-DIEM."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _scan_kwargs(kwargs: dict) -> dict:
    keys = ("t", "t_mult", "oversample", "power_iters", "seed", "exact", "magnitude", "alpha", "scaling",
            "allow_unmatched", "device", "threads", "method", "aligned", "unaligned", "components", "samples")
    return {k: kwargs.pop(k) for k in keys}


def _bases(base, adapters, profiles, quiet) -> dict:
    """Group adapters by base: the one given, or each adapter's, found offline."""
    if base is not None:
        return {base: list(adapters)}
    groups: dict = {}
    for adapter in adapters:
        located = find_base(adapter, profiles=list(profiles) or None)
        if not quiet:
            for warning in located.warnings:
                _say("warning", warning)
            click.echo(printable(f"{adapter}: base {located.detail}"), err=True)
        groups.setdefault(str(located.path), []).append(adapter)
    return groups


def _scan_all(base, adapters, profiles, quiet, options, *, profile_sha256=None, vouch=False) -> list:
    """Reports in the order the adapters were given, each base read once for its group.
    A profile among the bases is verified (against ``profile_sha256`` when given) and, with
    ``vouch``, named in a note with the base files it was built from."""
    results = {}
    for group_base, group in _bases(base, adapters, profiles, quiet).items():
        source = _base_source(group_base, profile_sha256, vouch)
        for adapter, result in zip(group, scan_many(source, group, **options)):
            results[adapter] = result
    reports = [results[a] for a in dict.fromkeys(adapters)]
    if not quiet:
        for result in reports:
            for warning in result.warnings:
                prefix = f"{result.inputs['adapter']['path']}: " if len(reports) > 1 else ""
                _say("warning", f"{prefix}{warning}")
    return reports


def _base_source(path: str, pin: str | None, vouch: bool):
    """The base to scan: an opened, verified Profile for a profile, else the path."""
    if not is_profile(path):
        if pin is not None:
            raise UsageError(f"--profile-sha256 pins a base profile; {path} is not a .ddiprofile file")
        return path
    profile = Profile(path, sha256=pin)
    if vouch:
        _say("note", f"{path}: profile sha256 {profile.sha256}, made from {profile.vouches_for()}")
    return profile


def _hex_digest(ctx, param, value):
    if value is not None and not (len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)):
        raise click.BadParameter("must be 64 hexadecimal digits (a sha256)")
    return value


profile_sha256_option = click.option(
    "--profile-sha256", default=None, callback=_hex_digest, metavar="HEX",
    help="Refuse a base profile whose digest (the sha256 'check' notes) is not HEX.")


profiles_option = click.option(
    "--profiles", multiple=True, type=_Path(file_okay=False),
    help="A directory of base profiles to search when no base is given (repeatable; also DDISCAN_PROFILES).")


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="[BASE] ADAPTER...", type=_Path())
@scan_options
@profiles_option
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Output format.  [default: table on stdout, json with -o]")
@click.option("-o", "--output", type=_Path(output=True), default=None, callback=_output,
              help="Write the report to OUTPUT (atomically) instead of stdout; with several adapters, "
                   "a directory for one JSON report each (named by the adapters' paths), "
                   "or one file with --format jsonl.")
@click.option("--heatmap", "heatmap_", is_flag=True, help="Also print DDI by block and module kind as a shaded grid.")
@click.option("--plot", type=_Path(output=True, dir_okay=False), default=None, callback=_plot_output,
              help="Draw the heatmap and the sorted DDI curve to PLOT (.png or .svg; needs the 'plot' extra).")
@profile_sha256_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no warnings on stderr.")
def report(paths, profiles, fmt, output, heatmap_, plot, profile_sha256, quiet, **kwargs):
    """Rank every LoRA-updated module of each ADAPTER by DDI against BASE.

    BASE is a .safetensors file, a sharded checkpoint (its directory or its
    model.safetensors.index.json), a directory holding one, or a base profile
    (.ddiprofile). ADAPTER is a .safetensors file or a PEFT adapter directory
    (adapter_config.json + adapter_model.safetensors). With several adapters each base
    tensor is read once for all of them. With a single ADAPTER and no BASE, the base
    named by its adapter_config.json is looked up offline (local path, Hugging Face
    cache, --profiles).
    """
    base, adapters = (None, list(paths)) if len(paths) == 1 else (paths[0], list(paths[1:]))
    several = len(adapters) > 1
    if (heatmap_ or plot) and kwargs["method"] != "ddi":
        raise click.UsageError("--heatmap and --plot show DDI; use them with --method ddi")
    if several and plot is not None:
        raise click.UsageError("--plot draws one adapter's report; give one ADAPTER")
    if several and output is not None and fmt not in (None, "json", "jsonl"):
        raise click.UsageError("with several adapters, -o takes --format json (a directory) or jsonl (one file)")
    inputs = [p for p in (base, *adapters, kwargs["aligned"], kwargs["unaligned"]) if p]
    fmt = fmt or ("json" if output else "table")
    targets = _report_files(output, list(dict.fromkeys(adapters))) if several and output and fmt == "json" else {}
    refuse_same_outputs({"-o": None if targets else output, "--plot": plot})
    for out in (output, plot, *targets.values()):
        if out is not None:
            refuse_input_as_output(out, inputs)
    options = _scan_kwargs(kwargs)
    reports = _scan_all(base, adapters, profiles, quiet, {"progress": not quiet and sys.stderr.isatty(), **options},
                        profile_sha256=profile_sha256)
    if targets:
        _write_reports(output, targets.values(), reports)
        if not quiet:
            click.echo(f"wrote {_count(len(reports), 'report')} to {output}", err=True)
    else:
        text = "".join(_titled(r, fmt, several) for r in reports)
        if output is None:
            click.echo(text, nl=False)
        else:
            write_atomic(output, text.encode("utf-8"))
            if not quiet:
                click.echo(f"wrote {output} ({_count(sum(len(r.modules) for r in reports), 'module')})", err=True)
    if heatmap_:
        for result in reports:
            click.echo(_titled(result, "heatmap", several), nl=False)
    if plot is not None:
        plot_report(reports[0], plot)


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
    deepest = list(choices[-1].values())
    clash = next(n for n in deepest if deepest.count(n) > 1)
    first, second = [a for a, n in choices[-1].items() if n == clash][:2]
    raise UsageError(f"{first} and {second}: both reports would be {Path(output) / choices[0][first]}; "
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


def _titled(result, fmt: str, several: bool) -> str:
    text = heatmap(result, color=sys.stdout.isatty()) if fmt == "heatmap" else render(result, fmt)
    if several and fmt in ("table", "markdown", "heatmap"):
        return f"== {printable(result.inputs['adapter']['path'])} ==\n{text}\n"
    return text


CHECK_FORMATS = ("terse", *FORMATS)


@cli.command()
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER...", type=_Path())
@click.option("--base", type=_Path(), default=None,
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
    """Check that no module of any ADAPTER exceeds a DDI limit (for CI and pre-commit).

    Exit 0 when every module passes, 1 when any exceeds --max-ddi or --max-ddi-norm (one
    line each: FILE:1: MODULE: DDI VALUE > LIMIT), 2 on usage errors, 3 on bad input.
    ADAPTER may be a PEFT directory, a .safetensors file, or an adapter_config.json (its
    directory is checked), as pre-commit passes them. A .safetensors file with no LoRA key
    in its header outside a PEFT directory (a base, an embedding), an MLX-LM adapter (not read
    yet), or an adapter_config.json without adapter weights beside it, is passed over with a note.
    """
    limits = {"ddi": (max_ddi, max_ddi_norm), "safelora": (min_cosine,), "splora": (max_ediem,)}
    if all(limit is None for limit in limits[kwargs["method"]]):
        flags = {"ddi": "--max-ddi and/or --max-ddi-norm", "safelora": "--min-cosine", "splora": "--max-ediem"}
        raise click.UsageError(f"give {flags[kwargs['method']]}")
    targets, notes = _check_targets(adapters)
    if not quiet:
        for note in notes:
            _say("note", note)
    reports = (_scan_all(base, targets, profiles, True, _scan_kwargs(kwargs), profile_sha256=profile_sha256,
                         vouch=not quiet) if targets else [])
    failures = []
    for result in reports:
        where = printable(result.inputs["adapter"]["file"])
        for m in result.modules:
            for label, value, limit, above in (("DDI", m.ddi, max_ddi, True),
                                               ("DDI_norm", m.ddi_norm, max_ddi_norm, True),
                                               ("cosine", m.cosine, min_cosine, False),
                                               ("E-DIEM", m.ediem, max_ediem, True)):
                if limit is None or (m.finite and value is None):
                    continue
                if value is None or (value > limit if above else value < limit):
                    shown = "not finite" if value is None else f"{value:.6g}"
                    failures.append(f"{where}:1: {printable(m.name)}: {label} {shown} {'>' if above else '<'} {limit:g}")
    if fmt == "terse":
        for line in failures:
            click.echo(line)
        if not quiet:
            modules = sum(len(r.modules) for r in reports)
            verdict = f"{len(failures)} failing" if failures else "all pass"
            click.echo(f"ddiscan check: {len(reports)} adapter(s), {modules} modules: {verdict}", err=True)
    else:
        click.echo("".join(_titled(r, fmt, len(reports) > 1) for r in reports), nl=False)
        for line in failures:
            click.echo(line, err=True)
    sys.exit(1 if failures else 0)


_PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")


def _check_targets(paths) -> tuple[list[str], list[str]]:
    """The adapters among PATHS, each once, and a note for each path passed over."""
    targets, notes = [], []
    for path in paths:
        target, note = _adapter_of(path)
        if note is None:
            targets.append(target)
        else:
            notes.append(note)
    return list(dict.fromkeys(targets)), notes


def _adapter_of(path: str) -> tuple[str | None, str | None]:
    """The adapter a file belongs to (a PEFT directory for its config or weights file), or
    None and why the file is not one.

    A PEFT directory (adapter_config.json and adapter weights) is always checked, and so is
    any file whose keys the reader takes for LoRA tensors, so that a broken adapter fails;
    only a file with no such key at all, or a config with no weights, is passed over.
    """
    p = Path(path)
    if p.name == "adapter_config.json":
        if any((p.parent / name).exists() for name in _PEFT_WEIGHTS):
            return str(p.parent), None
        return None, f"{path}: no adapter_model.safetensors beside it, not a PEFT adapter; passed over"
    if p.suffix != ".safetensors" or not p.is_file():
        return path, None
    if p.name == _PEFT_WEIGHTS[0] and (p.parent / "adapter_config.json").is_file():
        return str(p.parent), None
    kind = adapter_kind(SafetensorsFile(p).keys())
    if kind is None:
        return None, f"{path}: not a LoRA adapter (no LoRA key in its header, not in a PEFT directory); passed over"
    if kind == "mlx":
        return None, f"{path}: an MLX-LM adapter (lora_a/lora_b keys), which ddiscan does not read yet; passed over"
    return path, None


@cli.command()
@click.argument("base", type=_Path())
@click.option("-o", "--output", type=_Path(output=True, dir_okay=False), required=True,
              help="The profile to write (a .ddiprofile file).")
@click.option("--max-t", type=click.IntRange(min=1), default=64, show_default=True,
              help="Widest subspace stored; any t up to MAX_T can be scored.")
@click.option("--include", multiple=True, help="Only weights whose key matches this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Skip weights whose key matches this glob (repeatable).  "
              "[default: embeddings, LM head, norms]")
@click.option("--oversample", type=click.IntRange(min=0), default=DEFAULT_OVERSAMPLE, show_default=True,
              help="Oversampling q of the randomized range finder.")
@click.option("--power-iters", type=click.IntRange(min=0), default=DEFAULT_POWER_ITERS, show_default=True,
              help="Power iterations of the randomized range finder.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the random test matrices.")
@click.option("--exact", is_flag=True, help="Subspaces from full float64 SVDs.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def profile(base, output, max_t, include, exclude, oversample, power_iters, seed, exact, force, quiet):
    """Store what scoring needs from BASE in a small profile, to check adapters without it.

    For each weight a LoRA could target: its shape, its Frobenius norm and orthonormal
    bases of its dominant column and row spaces up to --max-t, plus the sketch
    parameters and the base files' names, sizes and sha256.
    """
    refuse_input_as_output(output, [base])
    summary = build_profile(
        base, output, max_t=max_t, include=include, exclude=exclude or DEFAULT_EXCLUDE, oversample=oversample,
        power_iters=power_iters, seed=seed, exact=exact, force=force, progress=not quiet and sys.stderr.isatty(),
    )
    share = 100.0 * summary["size"] / summary["base_size"] if summary["base_size"] else 0.0
    click.echo(f"wrote {output}: {summary['weights']} weights, {summary['size']} bytes ({share:.1f}% of the base)")


@cli.command()
@click.argument("paths", nargs=-1, metavar="[BASE] ADAPTER", type=_Path())
@scan_options
@click.option("--top", type=click.IntRange(min=0), default=None,
              help="Prune the TOP most suspect modules: largest DDI (lowest cosine, largest E-DIEM).")
@click.option("--theta", type=FINITE, default=None,
              help="Prune every module with DDI >= THETA (cosine <= THETA, E-DIEM >= THETA).")
@click.option("--theta-norm", type=FINITE, default=None, help="Prune every module with DDI_norm >= THETA_NORM.")
@click.option("--mode", "--rewrite", "mode", type=click.Choice(MODES), default="zero", show_default=True,
              help="zero: keep every key, write zeros; drop: remove the pruned modules' tensors; "
                   "project: SafeLoRA's lora_B <- C*lora_B (--method safelora).")
@click.option("-o", "--output", type=_Path(output=True), default=None, callback=_output,
              help="The pruned adapter: a file for a file, a directory for a PEFT directory.")
@click.option("--force", is_flag=True,
              help="Replace an existing output (a directory only if ddiscan prune wrote it).")
@click.option("--dry-run", is_flag=True, help="Print the selection and write nothing.")
@click.option("--from-report", type=_Path(), default=None,
              help="Take the scores from an earlier JSON report instead of scanning BASE.")
@click.option("--report-out", type=_Path(output=True, dir_okay=False), default=None, callback=_output,
              help="Write the JSON report, each module marked kept or pruned.")
@click.option("--plot", type=_Path(output=True, dir_okay=False), default=None, callback=_plot_output,
              help="Draw the heatmap and the sorted DDI curve with the cut marked (.png or .svg).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no warnings on stderr.")
def prune(paths, top, theta, theta_norm, mode, output, force, dry_run, from_report, report_out, plot, quiet, **kwargs):
    """Write ADAPTER with the updates of the most suspect modules removed.

    Select by exactly one of --top, --theta, --theta-norm (ties broken by module name);
    modules are ranked by DDI, or by the --method's own score.
    With --from-report, BASE is not read; ADAPTER defaults to the report's adapter.
    """
    if from_report is not None and len(paths) <= 1:
        base = None
        adapter = paths[0] if paths else _report_adapter(from_report)
    elif len(paths) == 2:
        base, adapter = paths
    else:
        raise click.UsageError("give BASE and ADAPTER (or --from-report REPORT [ADAPTER])")
    if plot is not None and kwargs["method"] != "ddi":
        raise click.UsageError("--plot shows DDI; use it with --method ddi")
    inputs = [p for p in (base, adapter, from_report, kwargs["aligned"], kwargs["unaligned"]) if p]
    refuse_same_outputs({"-o": output, "--report-out": report_out, "--plot": plot})
    for out in (output, report_out, plot):
        if out is not None:
            refuse_input_as_output(out, inputs, replaces_directory=out == output and Path(adapter).is_dir())
    result = prune_adapter(
        base, adapter, output, top=top, theta=theta, theta_norm=theta_norm, mode=mode, force=force,
        dry_run=dry_run, from_report=from_report,
        **({} if from_report else {"progress": not quiet and sys.stderr.isatty(), **_scan_kwargs(kwargs)}),
    )
    if not quiet:
        for warning in result.report.warnings:
            _say("warning", warning)
    method = result.report.method
    field, label, _ = SCORES[method]
    finite = [getattr(m, field) for m in result.report.modules if m.finite]
    chosen = result.selection.modules
    if finite and (len(chosen) == len(finite) or (not chosen and result.selection.rule != "top")):
        what = "no module" if not chosen else "every module"
        spread = f"{label} ranges from {min(finite):.6g} to {max(finite):.6g}"
        if method == "ddi":
            norms = [m.ddi_norm for m in result.report.modules if m.finite]
            spread += f" (DDI_norm {min(norms):.6g} to {max(norms):.6g})"
        _say("warning", f"{result.selection.describe()} selects {what}; {spread}")
    rank = {m.name: i + 1 for i, m in enumerate(result.report.modules)}
    click.echo(f"selected {len(chosen)} of {len(result.report.modules)} modules ({result.selection.describe()}):")
    for m in chosen:
        click.echo(f"  {rank[m.name]:>4}  {printable(m.name)}  {label} {getattr(m, field):.6g}")
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
        adapter = read_json(path, "a ddiscan JSON report")["inputs"]["adapter"]["path"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a ddiscan JSON report ({exc})") from None
    if not isinstance(adapter, str):
        raise InputError(f"{path}: not a ddiscan JSON report (inputs.adapter.path is not a string)")
    return adapter


def main():
    cli(prog_name="ddiscan")


if __name__ == "__main__":
    main()
