"""Stream LoRA modules through the scorers, one base weight at a time.

The base is a :class:`~ddiscan.sources.WeightSource` (a checkpoint, a profile, or the
alignment update of an aligned/unaligned pair), read in its own order. While one weight is
scored, a thread maps the next into the page cache; the current weight alone is widened
(float32; float64 with ``exact``), its subspaces found once for all adapters and ranks that
need them, and released before the next: a few tensors are resident whatever the base's
size, and base weights without a LoRA pair are never read.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
from tqdm import tqdm

from . import spectral
from ._version import __version__
from .errors import UsageError
from .io.reader import sha256
from .lora import Adapter, LoraModule, load_adapter, lora_factors, match_modules, orient
from .loha_lokr import structured_factors
from .options import (DEFAULT_KRYLOV_ITERS, DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, DEFAULT_SKETCH, OptionError,
                      ScanOptions)
from .report import SCHEMA_VERSION, Report, summarize
from .score import METHOD_TABLE
from .sketch import Sketch
from .sources import WeightSource, open_source
from .structured import Kron

__all__ = ["scan", "scan_many", "DEFAULT_POWER_ITERS", "DEFAULT_OVERSAMPLE"]


def _array_namespace(device: str):
    if device == "cpu":
        return np
    if device == "cuda":
        try:
            import cupy  # noqa: F401
            from array_api_compat import cupy as xp
        except ImportError:
            raise OptionError("{device} cuda needs CuPy: pip install 'ddiscan[gpu]'", "device") from None
        return xp
    raise OptionError(f"unknown {{device}} {device!r} (cpu or cuda)", "device")


def _subspace_size(module: LoraModule, t: int | None, t_mult: float | None) -> int:
    if t is None:
        t = math.ceil(t_mult * module.r) if t_mult is not None else module.r
    return max(1, min(t, module.d, module.k))


class _Weight:
    """One loaded base weight as the scorers see it: its norm, the matrix oriented for a
    module, and Q_t found once per (orientation, t) however many adapters update it."""

    def __init__(self, source: WeightSource, key: str, matrix, norm: float, xp):
        self.source, self.key, self.matrix, self.norm, self.xp = source, key, matrix, norm, xp
        self.bases: dict = {}

    def oriented(self, module: LoraModule):
        return self.xp.asarray(orient(module, self.matrix))

    def basis(self, module: LoraModule, t: int):
        key = (module.transpose_base, t)
        if key not in self.bases:
            self.bases[key] = self.source.basis(self.key, self.matrix, module=module, t=t, xp=self.xp)
        return self.bases[key]


def _read_ahead(items, fetch, load, *, enabled: bool):
    """Yield ``(item, load(item, fetch(item)))`` while a thread fetches the next item —
    maps it and brings its bytes into the page cache — so reading overlaps computing; the
    thread waits on I/O and leaves the cores to BLAS, and only the current item is
    widened in memory."""
    if not enabled or len(items) < 2:
        for item in items:
            yield item, load(item, fetch(item))
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddiscan-read") as pool:
        ahead = pool.submit(fetch, items[0])
        for i, item in enumerate(items):
            mapped = ahead.result()
            ahead = pool.submit(fetch, items[i + 1]) if i + 1 < len(items) else None
            yield item, load(item, mapped)
            del mapped


@contextmanager
def _blas_threads(threads: int | None):
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads, user_api="blas"):
        yield


def effective_threads(threads: int | None) -> int | None:
    """The threads BLAS will use: ``threads``, or what the loaded BLAS is set to (None when
    no BLAS library can be inspected)."""
    if threads is not None:
        return threads
    from threadpoolctl import threadpool_info

    counts = [lib["num_threads"] for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return max(counts) if counts else None


def scan(base, adapter, **options) -> Report:
    """Score every LoRA-updated module of ``adapter`` against ``base`` (by DDI, or ``method``).

    Parameters
    ----------
    base : path-like, TensorIndex or Profile
        A ``.safetensors`` file, a sharded checkpoint (directory or ``*.index.json``), a
        directory holding one, a ``.gguf`` file, or a base profile (``*.ddiprofile``).
    adapter : path-like or Adapter
        An adapter file, or a PEFT or MLX-LM adapter directory.
    **options
        As for :func:`scan_many`.

    Returns
    -------
    Report
        Most suspect first (highest DDI or E-DIEM, lowest SafeLoRA cosine), non-finite last.
    """
    return scan_many(base, [adapter], **options)[0]


def scan_many(
    base,
    adapters,
    *,
    t: int | None = None,
    t_mult: float | None = None,
    oversample: int = DEFAULT_OVERSAMPLE,
    sketch: str = DEFAULT_SKETCH,
    krylov_iters: int = DEFAULT_KRYLOV_ITERS,
    power_iters: int = DEFAULT_POWER_ITERS,
    seed: int = 0,
    exact: bool = False,
    magnitude: str = "bounded",
    alpha: float | None = None,
    scaling: float | None = None,
    allow_unmatched: bool = False,
    device: str = "cpu",
    threads: int | None = None,
    read_ahead: bool = True,
    progress: bool = False,
    method: str = "ddi",
    aligned=None,
    unaligned=None,
    components: tuple[str, ...] | None = None,
    samples: int = 32,
    options: ScanOptions | None = None,
) -> list[Report]:
    """Score several adapters of one base, reading each base tensor once for all of them.

    Each report equals what :func:`scan` gives for that adapter alone.

    Parameters
    ----------
    base : path-like, TensorIndex or Profile
        As for :func:`scan`.
    adapters : sequence of path-like or Adapter
    t, t_mult, oversample, sketch, krylov_iters, power_iters, seed, exact, magnitude, alpha, scaling,
    allow_unmatched, device, threads, read_ahead, progress, method, aligned, unaligned, components, samples
        The fields of :class:`~ddiscan.options.ScanOptions`, which documents each.
    options : ScanOptions, optional
        All of the above as one value; when given, the keyword arguments are ignored.

    Returns
    -------
    list of Report, one per adapter, in order
    """
    if options is None:
        options = ScanOptions(t=t, t_mult=t_mult, oversample=oversample, sketch=sketch, krylov_iters=krylov_iters,
                              power_iters=power_iters, seed=seed,
                              exact=exact, magnitude=magnitude, alpha=alpha, scaling=scaling,
                              allow_unmatched=allow_unmatched, device=device, threads=threads,
                              read_ahead=read_ahead, progress=progress, method=method, aligned=aligned,
                              unaligned=unaligned, components=components, samples=samples)  # validates them
    return scan_with(base, adapters, options)


def scan_with(base, adapters, options: ScanOptions) -> list[Report]:
    """:func:`scan_many` with its options as one :class:`~ddiscan.options.ScanOptions`."""
    if not adapters:
        raise UsageError("give at least one adapter")
    xp = _array_namespace(options.device)
    sketch = Sketch(oversample=options.oversample, power_iters=options.power_iters, seed=options.seed,
                    exact=options.exact, kernel=options.sketch, krylov_iters=options.krylov_iters)
    source = open_source(base, sketch=sketch, aligned=options.aligned, unaligned=options.unaligned)
    parameters, notes = source.settle(_parameters(options))
    opened = [a if isinstance(a, Adapter) else load_adapter(a) for a in adapters]
    matched = [match_modules(a, source, alpha=options.alpha, scaling=options.scaling,
                             allow_unmatched=options.allow_unmatched) for a in opened]
    plan: dict[str, list[tuple[int, LoraModule]]] = {}
    for i, (modules, _, _) in enumerate(matched):
        for module in modules:
            plan.setdefault(module.base_key, []).append((i, module))
    with _blas_threads(options.threads), ThreadPoolExecutor(max_workers=1,
                                                            thread_name_prefix="ddiscan-hash") as hasher:
        # the adapters' sha256 for the reports, read once in the background: it also brings
        # their bytes into the page cache before their factors are needed
        digests = [hasher.submit(sha256, adapter.file) for adapter in opened]
        scores = _score_all(source, opened, plan, options, xp)
        return [_report(source, adapter, found, scores[i], parameters, notes, digests[i].result())
                for i, (adapter, found) in enumerate(zip(opened, matched))]


def _parameters(options: ScanOptions) -> dict:
    """The report's ``parameters``: the options as the scan ran them."""
    return {
        "t": options.t, "t_mult": options.t_mult, "oversample": options.oversample, "sketch": options.sketch,
        "krylov_iters": options.krylov_iters, "power_iters": options.power_iters, "seed": options.seed,
        "exact": options.exact,
        "magnitude": options.magnitude, "alpha": options.alpha, "scaling": options.scaling,
        "allow_unmatched": options.allow_unmatched, "device": options.device,
        "threads": effective_threads(options.threads), "eps": spectral.EPS, "method": options.method,
        "components": list(options.components) if options.components else None,
        "aligned": None if options.aligned is None else str(options.aligned),
        "unaligned": None if options.unaligned is None else str(options.unaligned), "samples": options.samples,
    }


def _factors(module: LoraModule, file, method: str):
    """A module's update as thin float64 (up, down); a LoKr module's as its Kronecker factors
    (:class:`~ddiscan.structured.Kron`) for DDI, which scores them without their product."""
    if module.family is not None:
        return structured_factors(module, file, structured=method == "ddi")
    return spectral.thin_factors(*lora_factors(module, file))


def _in_namespace(factors, xp):
    if isinstance(factors, Kron):
        return factors.asarray(xp), None
    return xp.asarray(factors[0]), xp.asarray(factors[1])


def _score_all(source: WeightSource, opened, plan, options: ScanOptions, xp) -> list[list]:
    """Every planned module's score, one base weight at a time in the source's order."""
    scorer = METHOD_TABLE[options.method].scorer

    def fetch(key):
        """Read a key's LoRA factors; let the source map what it needs."""
        factors = [_factors(module, opened[i].file, options.method) for i, module in plan[key]]
        return factors, source.fetch(key)

    def load(key, fetched):
        factors, mapped = fetched
        return factors, source.load(key, mapped)

    scores: list[list] = [[] for _ in opened]
    keys = source.order(plan)
    loaded = _read_ahead(keys, fetch, load, enabled=options.read_ahead)
    for key, (factors, (matrix, norm)) in tqdm(loaded, total=len(keys), desc="scanning", unit="weight",
                                               file=sys.stderr, disable=not options.progress):
        weight = _Weight(source, key, matrix, norm, xp)
        quantization = source.quantization(key)
        for (i, module), update in zip(plan[key], factors):
            size = _subspace_size(module, options.t, options.t_mult)
            up, down = _in_namespace(update, xp)
            score = scorer(module, up, down, weight, t=size, options=options, xp=xp)
            scores[i].append(score if quantization is None else dataclasses.replace(score, quantization=quantization))
        del factors, matrix, weight
    return scores


def _report(source, adapter: Adapter, found, scores, parameters, notes, digest: str) -> Report:
    _, skipped, warnings = found
    warnings = [*notes, *warnings]
    if any(not s.finite for s in scores):
        names = [s.name for s in scores if not s.finite]
        warnings.append(f"{len(names)} module(s) hold NaN or Inf and are not scored: {', '.join(names[:5])}")
    path = adapter.file.path
    return Report(
        schema_version=SCHEMA_VERSION,
        ddiscan_version=__version__,
        method=parameters["method"],
        inputs={
            "base": source.describe(),
            "adapter": {
                "path": str(adapter.path), "file": str(path), "size": path.stat().st_size,
                "sha256": digest, "config": adapter.config_source,
            },
        },
        parameters=dict(parameters),
        modules=Report.ranked(scores, parameters["method"]),
        skipped=[{"key": s.key, "reason": s.reason} for s in skipped],
        warnings=warnings,
        summary=summarize(scores),
    )
