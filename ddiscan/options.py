"""Every option of a scan as one value, validated once, with errors that name the parameter.

A :class:`ScanOptions` is what :func:`ddiscan.scan_many` (and every command that scans)
runs with. Its fields are the library's parameter names; a command line shows them as
flags by one table (``ddiscan.cli``), so no library message names a flag:
:class:`OptionError` keeps the parameter names apart from its text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .errors import UsageError

__all__ = ["ScanOptions", "OptionError", "DEFAULT_OVERSAMPLE", "DEFAULT_POWER_ITERS", "DEFAULT_SAMPLES",
           "DEFAULT_SKETCH", "DEFAULT_KRYLOV_ITERS", "METHODS", "MAGNITUDES", "SKETCHES"]

# Chosen from benchmarks/power_iters.py on the real all-MiniLM-L6-v2 weights: see README
# ("How the defaults were chosen") and benchmarks/POWER_ITERS.md.
DEFAULT_POWER_ITERS = 4
# Chosen from benchmarks/krylov.py on real weights: see benchmarks/KRYLOV.md
DEFAULT_SKETCH = "krylov"
DEFAULT_KRYLOV_ITERS = 4
DEFAULT_OVERSAMPLE = 8
DEFAULT_SAMPLES = 32
METHODS = ("ddi", "safelora", "splora")
MAGNITUDES = ("bounded", "raw")
SKETCHES = ("krylov", "subspace")


class OptionError(UsageError):
    """Options that contradict each other or are out of range; the message names the
    parameters as ``{name}`` (:class:`~ddiscan.errors.DdiscanError`)."""


@dataclass(frozen=True, kw_only=True)
class ScanOptions:
    """How a scan runs (README "ddiscan report" lists each as a flag).

    Parameters
    ----------
    t : int, optional
        Dimension of W0's dominant subspace; default the module's rank r.
    t_mult : float, optional
        Use t = ceil(t_mult · r) instead (2 is the paper's robust variant).
    oversample : int, default 8
        Extra columns q of the random test matrix.
    sketch : {"krylov", "subspace"}, default "krylov"
        The range finder: block Krylov iteration or subspace (power) iteration.
    krylov_iters : int, default 4
        Iterations of the block Krylov range finder (its block is t + oversample wide).
    power_iters : int, default 4
        Power iterations of the subspace range finder.
    seed : int, default 0
        Seed of the random test matrices; the same seed gives the same report.
    exact : bool, default False
        Take Q_t from a full SVD of W0 in float64 instead of the randomized finder.
    magnitude : {"bounded", "raw"}, default "bounded"
        DDI uses M_norm (bounded) or M (raw, the literal Eq. 6); both are reported.
    alpha, scaling : float, optional
        Override the adapter's scaling: s = alpha / r, or s = scaling.
    allow_unmatched : bool, default False
        Warn about LoRA modules with no base weight instead of failing.
    device : {"cpu", "cuda"}, default "cpu"
        ``cuda`` runs the kernels through CuPy (the ``gpu`` extra).
    threads : int, optional
        Threads BLAS may use; default: its own choice (usually one per core).
    read_ahead : bool, default True
        Read the next base tensor in the background while the current one is scored.
    progress : bool, default False
        Show a progress bar on stderr.
    method : {"ddi", "safelora", "splora"}, default "ddi"
        DDI (SPEC.md), SafeLoRA's cosine, or SPLoRA's E-DIEM; the last two need
        ``aligned`` and ``unaligned``.
    aligned, unaligned : path-like, optional
        The aligned checkpoint and its unaligned twin; their difference is the alignment update.
    components : tuple of "S", "O", "M", optional
        DDI's ablation: DDI becomes the product of these components.
    samples : int, default 32
        Reference rotations of E-DIEM.
    """

    t: int | None = None
    t_mult: float | None = None
    oversample: int = DEFAULT_OVERSAMPLE
    sketch: str = DEFAULT_SKETCH
    krylov_iters: int = DEFAULT_KRYLOV_ITERS
    power_iters: int = DEFAULT_POWER_ITERS
    seed: int = 0
    exact: bool = False
    magnitude: str = "bounded"
    alpha: float | None = None
    scaling: float | None = None
    allow_unmatched: bool = False
    device: str = "cpu"
    threads: int | None = None
    read_ahead: bool = True
    progress: bool = False
    method: str = "ddi"
    aligned: object = None
    unaligned: object = None
    components: tuple[str, ...] | None = None
    samples: int = DEFAULT_SAMPLES

    def __post_init__(self):
        for problem in _problems(self):
            raise problem

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The parameter names, in order."""
        return tuple(f.name for f in fields(cls))


def _problems(o: ScanOptions):
    """The first contradiction or out-of-range value, as an OptionError (a generator, so
    the checks read top to bottom and stop at the first)."""
    yield from _sketch_problems(o)
    yield from _scaling_problems(o)
    yield from _method_problems(o)


def _sketch_problems(o: ScanOptions):
    if o.t is not None and o.t_mult is not None:
        yield OptionError("give {t} or {t_mult}, not both", "t", "t_mult")
    if o.t is not None and o.t < 1:
        yield OptionError("{t} must be at least 1", "t")
    if o.t_mult is not None and not (math.isfinite(o.t_mult) and o.t_mult > 0):
        yield OptionError("{t_mult} must be positive", "t_mult")
    if o.oversample < 0 or o.power_iters < 0:
        yield OptionError("{oversample} and {power_iters} must be non-negative", "oversample", "power_iters")
    if o.krylov_iters < 0:
        yield OptionError("{krylov_iters} must be non-negative", "krylov_iters")
    if o.sketch not in SKETCHES:
        yield OptionError(f"{{sketch}} must be 'krylov' or 'subspace', not {o.sketch!r}", "sketch")
    if o.magnitude not in MAGNITUDES:
        yield OptionError(f"{{magnitude}} must be 'bounded' or 'raw', not {o.magnitude!r}", "magnitude")


def _scaling_problems(o: ScanOptions):
    for name in ("alpha", "scaling"):
        value = getattr(o, name)
        if value is not None and not math.isfinite(value):
            yield OptionError(f"{{{name}}} must be a finite number, not {value}", name)
    if o.alpha is not None and o.scaling is not None:
        yield OptionError("give {alpha} or {scaling}, not both", "alpha", "scaling")
    if o.threads is not None and o.threads < 1:
        yield OptionError("{threads} must be at least 1", "threads")


def _method_problems(o: ScanOptions):
    if o.method not in METHODS:
        yield OptionError(f"unknown method {o.method!r} (ddi, safelora or splora)")
    if o.method == "ddi" and (o.aligned is not None or o.unaligned is not None):
        yield OptionError("{aligned}/{unaligned} are for {method} safelora or splora", "aligned", "unaligned",
                          "method")
    if o.method != "ddi" and (o.aligned is None or o.unaligned is None):
        yield OptionError(f"{{method}} {o.method} needs both {{aligned}} and {{unaligned}}", "method", "aligned",
                          "unaligned")
    if o.components is not None and o.method != "ddi":
        yield OptionError("{components} is DDI's ablation; use it with {method} ddi", "components", "method")
    if o.samples < 2:
        yield OptionError("{samples} must be at least 2", "samples")
