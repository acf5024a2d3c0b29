"""The command line's options: the scan options derived from :class:`ScanOptions`' fields
(their help texts in one table), the table of flags errors are shown with, and the
parameter types and callbacks the commands share."""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, fields
from pathlib import Path

import click

from ..errors import InputError, OutputError, printable
from ..score import parse_components
from ..options import MAGNITUDES, METHODS, SKETCHES, ScanOptions
from ..plot import check_plot



def flag(name: str) -> str:
    """The flag of a library parameter: ``power_iters`` is ``--power-iters``."""
    return "--" + name.replace("_", "-")


MAX_THREADS = 4096


def say(prefix: str, message: str) -> None:
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


class PathType(click.Path):
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


def _components(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_components(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def output_path(ctx, param, value):
    """An output path, checked while the options are parsed, before any work or write:
    the directory it goes into must exist."""
    if value is not None and not Path(value).parent.is_dir():
        raise OutputError(f"{value}: cannot write (no directory {Path(value).parent})")
    return value


def plot_path(ctx, param, value):
    """A --plot picture: an output path (see output_path) of a known format, with matplotlib installed."""
    if output_path(ctx, param, value) is not None:
        check_plot(value)
    return value


# Each ScanOptions field the command line sets: its type and help (the default is the field's)
SCAN_FLAGS = {
    "t": (click.IntRange(min=1), "Dimension t of W0's dominant subspace.  [default: the module's rank r]"),
    "t_mult": (_Finite(min=0, min_open=True), "Use t = ceil(T_MULT * r) instead; 2 is the paper's robust variant."),
    "oversample": (click.IntRange(min=0), "Oversampling q of the randomized range finder."),
    "sketch": (click.Choice(SKETCHES), "Range finder: block Krylov or subspace (power) iteration."),
    "krylov_iters": (click.IntRange(min=0), "Iterations of the block Krylov range finder (block t + q wide)."),
    "power_iters": (click.IntRange(min=0), "Power iterations of the subspace range finder."),
    "seed": (click.IntRange(min=0), "Seed of the random test matrices (same seed, same report)."),
    "exact": (None, "Take W0's subspace from a full float64 SVD (slow; for verification)."),
    "magnitude": (click.Choice(MAGNITUDES), "DDI = S*O*M_norm (bounded) or S*O*M (raw, the paper's literal Eq. 6)."),
    "alpha": (FINITE, "Scaling s = ALPHA / r for every module (for adapters without a config)."),
    "scaling": (FINITE, "Scaling s for every module (for adapters without a config)."),
    "allow_unmatched": (None, "Warn about LoRA modules with no base weight instead of failing."),
    "device": (click.Choice(["cpu", "cuda"]), "Where to compute; cuda needs the 'gpu' extra (CuPy)."),
    "threads": (click.IntRange(min=1, max=MAX_THREADS),
                f"Threads BLAS may use (at most {MAX_THREADS}).  [default: one per core]"),
    "method": (click.Choice(METHODS),
               "DDI, SafeLoRA's cosine, or SPLoRA's E-DIEM (the last two need --aligned/--unaligned)."),
    "aligned": (PathType(), "The aligned (chat) checkpoint, for safelora/splora."),
    "unaligned": (PathType(), "Its unaligned pretrained twin, for safelora/splora."),
    "components": (None, "DDI ablation: score by the product of a subset of S,O,M (e.g. S,O)."),
    "samples": (click.IntRange(min=2), "Reference rotations of SPLoRA's E-DIEM."),
}
# the fields only a library caller sets (the commands choose them themselves)
LIBRARY_ONLY = ("read_ahead", "progress")
_CALLBACKS = {"components": _components}
_DEFAULTS = {f.name: f.default for f in fields(ScanOptions) if f.default is not MISSING}


def scan_option(name: str, help: str | None = None):
    """The click option of the ScanOptions field ``name``: its flag, type and default."""
    kind, text = SCAN_FLAGS[name]
    default = _DEFAULTS[name]
    if isinstance(default, bool):
        return click.option(flag(name), name, is_flag=True, default=default, help=help or text)
    return click.option(flag(name), name, type=kind, default=default, show_default=default is not None,
                        callback=_CALLBACKS.get(name), help=help or text)


def scan_options(fn):
    """Options shared by every command that scans: one per field of SCAN_FLAGS."""
    for name in reversed(SCAN_FLAGS):
        fn = scan_option(name)(fn)
    return fn


def scan_kwargs(kwargs: dict) -> dict:
    """The scan options among a command's parameters, taken out of ``kwargs``."""
    return {name: kwargs.pop(name) for name in SCAN_FLAGS}


def _hex_digest(ctx, param, value):
    if value is not None and not (len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)):
        raise click.BadParameter("must be 64 hexadecimal digits (a sha256)")
    return value


profile_sha256_option = click.option(
    "--profile-sha256", default=None, callback=_hex_digest, metavar="HEX",
    help="Refuse a base profile whose digest (the sha256 'check' notes) is not HEX.")

profiles_option = click.option(
    "--profiles", multiple=True, type=PathType(file_okay=False),
    help="A directory of base profiles to search when no base is given (repeatable; also DDISCAN_PROFILES).")

quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar and no warnings on stderr.")
