"""Stream LoRA modules through the DDI kernels, one base tensor at a time.

Every base weight that some adapter's LoRA pair updates is memory-mapped in file order,
widened once to the working dtype (float32; float64 with ``exact=True``) while the
previous one is scored, sketched once for all the adapters and ranks that need it, and
released before the next, so at most a few tensors are resident whatever the base's size,
and base tensors without a LoRA pair are never read.
"""

from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
from tqdm import tqdm

from . import methods, spectral
from ._version import __version__
from .errors import InputError, ShapeMismatch, UsageError
from .io.index import TensorIndex
from .io.reader import sha256
from .io.convert import frobenius, widen
from .options import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, OptionError, ScanOptions
from .lora import Adapter, LoraModule, load_adapter, lora_factors, match_modules, orient
from .profile import Profile, is_profile
from .report import SCHEMA_VERSION, ModuleScore, Report, summarize

__all__ = ["scan", "scan_many", "score_module", "DEFAULT_POWER_ITERS", "DEFAULT_OVERSAMPLE"]



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


def score_module(module: LoraModule, up, down, basis, base_norm: float, *, t: int,
                 use_raw_magnitude: bool, xp, components: tuple[str, ...] | None = None) -> ModuleScore:
    """Score one module (SPEC.md §2–3).

    ``up`` (d × r) and ``down`` (r × k) are float64 arrays of namespace ``xp``; ``basis``
    is a function returning Q_t (d × t), called only when the module's numbers are finite;
    ``base_norm`` is ‖W0‖_F. ``components`` (a subset of S, O, M) makes DDI their product,
    for the paper's ablation.
    """
    fields = _fields(module, t)
    if not _finite_inputs(module, up, down, base_norm, xp):
        return ModuleScore(**fields, finite=False)
    spectrum = spectral.update_spectrum(up, down, module.scale, xp=xp)
    delta_norm = _finite_norm(module, spectrum)
    sharp = spectral.sharpness(spectrum)
    dev = spectral.deviation(basis(), up, spectrum, module.scale, xp=xp)
    mag = spectral.magnitude(delta_norm, base_norm)
    mag_norm = spectral.magnitude_norm(delta_norm, base_norm)
    ddi_raw = sharp * dev * mag
    chosen = mag if use_raw_magnitude else mag_norm
    ddi = sharp * dev * chosen if components is None else methods.components(
        components, sharpness=sharp, deviation=dev, magnitude=chosen)
    return ModuleScore(
        **fields, finite=True, sharpness=sharp, deviation=dev, magnitude=mag, magnitude_norm=mag_norm,
        ddi=ddi, ddi_raw=ddi_raw, ddi_norm=ddi / (1.0 + ddi), delta_norm=delta_norm, base_norm=base_norm,
    )


def score_alignment(module: LoraModule, up, down, diff, diff_norm: float, *, t: int, method: str,
                    samples: int, seed: int, xp) -> ModuleScore:
    """Score one module by SafeLoRA's cosine or SPLoRA's E-DIEM (:mod:`ddiscan.methods`);
    ``diff`` is W_aligned − W_unaligned (d × k) and ``diff_norm`` its Frobenius norm."""
    fields = _fields(module, t)
    if not _finite_inputs(module, up, down, diff_norm, xp):
        return ModuleScore(**fields, finite=False)
    spectrum = spectral.update_spectrum(up, down, module.scale, xp=xp)
    common = dict(sharpness=spectral.sharpness(spectrum), delta_norm=_finite_norm(module, spectrum))
    if method == "safelora":
        cosine = methods.safelora_score(diff, up, down, module.scale, diff_norm=diff_norm, xp=xp).cosine
        return ModuleScore(**fields, finite=math.isfinite(cosine), cosine=cosine, **common)
    score = methods.ediem_score(diff, up, down, module.scale, diff_norm=diff_norm, samples=samples, seed=seed,
                                xp=xp).score
    return ModuleScore(**fields, finite=math.isfinite(score), ediem=score, **common)


def _fields(module: LoraModule, t: int) -> dict:
    return dict(
        name=module.name, base_key=module.base_key, kind=module.kind, block=module.block,
        layout=module.layout, d=module.d, k=module.k, r=module.r, t=t,
        scale=module.scale if math.isfinite(module.scale) else None,  # a NaN/Inf .alpha or lora_alpha
        scale_source=module.scale_source, transposed=module.transpose_base, dora=module.dora_key is not None,
    )


def _finite_norm(module: LoraModule, spectrum) -> float:
    """‖ΔW‖_F, or InputError when finite factors and scale make an update beyond float64."""
    norm = spectrum.norm
    if not math.isfinite(norm):
        raise InputError(f"{module.name}: ‖ΔW‖_F = ‖s · B · A‖_F exceeds the float64 range "
                         f"(scale {module.scale:g}); the factors or the scaling are corrupt")
    return norm


def _finite_inputs(module: LoraModule, up, down, norm: float, xp) -> bool:
    """Whether the scale, the factors and the weight's norm are all finite (NaN/Inf is
    reported as a non-finite module, not an error)."""
    return (math.isfinite(module.scale) and math.isfinite(norm)
            and bool(xp.all(xp.isfinite(up))) and bool(xp.all(xp.isfinite(down))))


class _Subspaces:
    """Q_t for the modules of one base weight: sketched from W0 (or read from a profile)
    once per (orientation, t), however many adapters update that weight."""

    def __init__(self, source, key, w0, *, oversample, power_iters, seed, exact, xp, omega_cache):
        self.source, self.key, self.w0, self.xp = source, key, w0, xp
        self.oversample, self.power_iters, self.seed, self.exact = oversample, power_iters, seed, exact
        self.omega_cache, self.cache = omega_cache, {}

    def __call__(self, module: LoraModule, t: int):
        return lambda: self._basis(module, t)

    def _basis(self, module: LoraModule, t: int):
        key = (module.transpose_base, t)
        if key not in self.cache:
            xp = self.xp
            if isinstance(self.source, Profile):
                self.cache[key] = xp.asarray(self.source.basis(self.key, transposed=module.transpose_base, t=t))
            else:
                w0 = xp.asarray(orient(module, self.w0))
                if self.exact:
                    self.cache[key] = spectral.exact_basis(w0, t=t, xp=xp)
                else:
                    width = min(t + self.oversample, module.d, module.k)
                    shape = (module.k, width, str(w0.dtype))
                    if shape not in self.omega_cache:  # Ω depends on the shape only (erratum E4)
                        omega = spectral.gaussian_test_matrix(module.k, width, self.seed)
                        self.omega_cache[shape] = xp.astype(xp.asarray(omega), w0.dtype)
                    self.cache[key] = spectral.randomized_basis(
                        w0, self.omega_cache[shape], t=t, power_iters=self.power_iters, xp=xp)
        return self.cache[key]


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


def _open_base(base):
    if isinstance(base, (TensorIndex, Profile)):
        return base
    return Profile(base) if is_profile(base) else TensorIndex(base)


def _reading_order(source, keys):
    """Base keys in file and offset order, so a scan reads each shard front to back."""
    if isinstance(source, Profile):
        return sorted(keys)
    return sorted(keys, key=lambda k: (str(source.weight_map[k]), source.info(k).start))


def scan(base, adapter, **options) -> Report:
    """Score every LoRA-updated module of ``adapter`` against ``base`` by DDI.

    Parameters
    ----------
    base : path-like, TensorIndex or Profile
        A ``.safetensors`` file, a sharded checkpoint (directory or ``*.index.json``), a
        directory holding one, or a base profile (``*.ddiprofile``).
    adapter : path-like or Adapter
        A ``.safetensors`` adapter file or a PEFT adapter directory.
    **options
        As for :func:`scan_many`.

    Returns
    -------
    Report
        Modules sorted by DDI, highest first.
    """
    return scan_many(base, [adapter], **options)[0]


def scan_many(
    base,
    adapters,
    *,
    t: int | None = None,
    t_mult: float | None = None,
    oversample: int = DEFAULT_OVERSAMPLE,
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
) -> list[Report]:
    """Score several adapters of one base, reading each base tensor once for all of them.

    Each report equals what :func:`scan` gives for that adapter alone.

    Parameters
    ----------
    base : path-like, TensorIndex or Profile
        As for :func:`scan`.
    adapters : sequence of path-like or Adapter
    t : int, optional
        Dimension of W0's dominant subspace; default the module's rank r.
    t_mult : float, optional
        Use t = ceil(t_mult · r) instead (2 is the paper's robust variant).
    oversample : int, default 8
        Extra columns q of the random test matrix.
    power_iters : int, default 4
        Power iterations of the range finder.
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
        Ask the kernel to read the next base tensor in the background while the current
        one is scored (``posix_fadvise(WILLNEED)``).
    progress : bool, default False
        Show a progress bar on stderr.
    method : {"ddi", "safelora", "splora"}, default "ddi"
        DDI (SPEC.md), SafeLoRA's cosine, or SPLoRA's E-DIEM (:mod:`ddiscan.methods`);
        the last two need ``aligned`` and ``unaligned``.
    aligned, unaligned : path-like, optional
        The aligned (chat) checkpoint and its unaligned pretrained twin, anything a base may
        be but a profile; their difference is the alignment update A.
    components : tuple of "S", "O", "M", optional
        DDI's ablation: DDI becomes the product of these components.
    samples : int, default 32
        Reference rotations of E-DIEM.

    Returns
    -------
    list of Report, one per adapter, in order
    """
    ScanOptions(t=t, t_mult=t_mult, oversample=oversample, power_iters=power_iters, seed=seed, exact=exact,
                magnitude=magnitude, alpha=alpha, scaling=scaling, allow_unmatched=allow_unmatched, device=device,
                threads=threads, read_ahead=read_ahead, progress=progress, method=method, aligned=aligned,
                unaligned=unaligned, components=components, samples=samples)  # validates them
    if not adapters:
        raise UsageError("give at least one adapter")
    xp = _array_namespace(device)

    source = _open_base(base)
    parameters = {
        "t": t, "t_mult": t_mult, "oversample": oversample, "power_iters": power_iters,
        "seed": seed, "exact": exact, "magnitude": magnitude, "alpha": alpha, "scaling": scaling,
        "allow_unmatched": allow_unmatched, "device": device, "threads": effective_threads(threads),
        "eps": spectral.EPS,
        "method": method, "components": list(components) if components else None,
        "aligned": None if aligned is None else str(aligned),
        "unaligned": None if unaligned is None else str(unaligned), "samples": samples,
    }
    pair = None if method == "ddi" else (TensorIndex(aligned), TensorIndex(unaligned))
    notes: list[str] = []
    if isinstance(source, Profile):
        given = {"oversample": oversample, "power_iters": power_iters, "seed": seed, "exact": exact}
        if given != source.parameters:
            notes.append(f"the profile was sketched with {source.parameters}; its subspaces are used as they are")
        parameters.update(source.parameters)
        exact = source.parameters["exact"]

    opened = [a if isinstance(a, Adapter) else load_adapter(a) for a in adapters]
    matched = [match_modules(a, source, alpha=alpha, scaling=scaling, allow_unmatched=allow_unmatched)
               for a in opened]
    plan: dict[str, list[tuple[int, LoraModule]]] = {}
    for i, (modules, _, _) in enumerate(matched):
        for module in modules:
            plan.setdefault(module.base_key, []).append((i, module))
    dtype = np.float64 if exact else np.float32

    def fetch(key):
        """Read a key's LoRA factors; map the base tensors it needs and bring their bytes
        into the page cache."""
        factors = [spectral.thin_factors(*lora_factors(module, opened[i].file)) for i, module in plan[key]]
        if pair is not None:
            return factors, _alignment_pair(pair, key, source.info(key).shape)
        return factors, None if isinstance(source, Profile) else source.fetch(key)

    def load(key, fetched):
        """Widen one base weight (or form the alignment update A)."""
        factors, mapped = fetched
        if pair is not None:
            diff = _difference(pair, key, *mapped)
            return factors, diff, frobenius(diff)
        if isinstance(source, Profile):
            return factors, None, source.norm(key)
        w0, norm = widen(mapped, dtype, encoding=source.info(key).dtype)
        return factors, w0, norm

    scores: list[list[ModuleScore]] = [[] for _ in opened]
    omega_cache: dict = {}
    sketch = dict(oversample=oversample, power_iters=power_iters, seed=seed, exact=exact, xp=xp,
                  omega_cache=omega_cache)
    with _blas_threads(threads), ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddiscan-hash") as hasher:
        # the adapters' sha256 for the reports, read once in the background: it also brings
        # their bytes into the page cache before their factors are needed
        digests = [hasher.submit(sha256, adapter.file) for adapter in opened]
        keys = _reading_order(source, plan)
        loaded = _read_ahead(keys, fetch, load, enabled=read_ahead)
        for key, (factors, w0, norm) in tqdm(loaded, total=len(keys), desc="scanning", unit="weight",
                                             file=sys.stderr, disable=not progress):
            subspaces = _Subspaces(source, key, w0, **sketch)
            for (i, module), (up, down) in zip(plan[key], factors):
                size = _subspace_size(module, t, t_mult)
                up, down = xp.asarray(up), xp.asarray(down)
                if pair is None:
                    scores[i].append(score_module(
                        module, up, down, subspaces(module, size), norm, t=size,
                        use_raw_magnitude=magnitude == "raw", xp=xp, components=components,
                    ))
                else:
                    scores[i].append(score_alignment(
                        module, up, down, xp.asarray(orient(module, w0)), norm, t=size, method=method,
                        samples=samples, seed=seed, xp=xp,
                    ))
            del factors, w0, subspaces
        return [_report(source, adapter, found, scores[i], parameters, notes, digests[i].result())
                for i, (adapter, found) in enumerate(zip(opened, matched))]


def _alignment_pair(pair, key: str, shape) -> tuple[np.ndarray, np.ndarray]:
    """W_aligned and W_unaligned for one base key, mapped and fetched, checked against the
    base's shape."""
    for index in pair:
        if key not in index:
            raise InputError(f"{index.path}: has no {key}, which the adapter updates")
        if tuple(index.info(key).shape) != tuple(shape):
            raise ShapeMismatch(f"{index.path}: {key} is {list(index.info(key).shape)}, the base's is {list(shape)}")
    return pair[0].fetch(key), pair[1].fetch(key)


def _alignment_update(pair, key: str, shape) -> np.ndarray:
    """A = W_aligned − W_unaligned for one base key, float32."""
    return _difference(pair, key, *_alignment_pair(pair, key, shape))


def _difference(pair, key: str, aligned, unaligned) -> np.ndarray:
    diff, _ = widen(aligned, encoding=pair[0].info(key).dtype)
    diff -= widen(unaligned, encoding=pair[1].info(key).dtype)[0]
    return diff


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
