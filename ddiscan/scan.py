"""Stream LoRA modules through the DDI kernels, one base tensor at a time.

For each matched module the base weight is memory-mapped, converted once to the working
dtype (float32; float64 with ``exact=True``), scored, and released before the next one is
touched, so at most a few tensors are resident whatever the base's size, and base tensors
without a LoRA pair are never read.
"""

from __future__ import annotations

import hashlib
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import spectral
from ._version import __version__
from .errors import UsageError
from .io.index import TensorIndex
from .io.convert import widen
from .lora import Adapter, LoraModule, load_adapter, lora_factors, match_modules, orient
from .report import SCHEMA_VERSION, ModuleScore, Report, summarize

__all__ = ["scan", "score_module", "DEFAULT_POWER_ITERS", "DEFAULT_OVERSAMPLE"]

# Chosen from benchmarks/power_iters.py on the real all-MiniLM-L6-v2 weights: see README
# ("How the defaults were chosen") and benchmarks/POWER_ITERS.md.
DEFAULT_POWER_ITERS = 4
DEFAULT_OVERSAMPLE = 8


def _array_namespace(device: str):
    if device == "cpu":
        return np
    if device == "cuda":
        try:
            import cupy  # noqa: F401
            from array_api_compat import cupy as xp
        except ImportError:
            raise UsageError("--device cuda needs CuPy: pip install 'ddiscan[gpu]'") from None
        return xp
    raise UsageError(f"unknown device {device!r} (cpu or cuda)")


def _subspace_size(module: LoraModule, t: int | None, t_mult: float | None) -> int:
    if t is None:
        t = math.ceil(t_mult * module.r) if t_mult is not None else module.r
    return max(1, min(t, module.d, module.k))


def score_module(module: LoraModule, up, down, w0, base_norm: float, *, t: int, oversample: int,
                 power_iters: int, seed: int, exact: bool, use_raw_magnitude: bool, xp,
                 omega_cache: dict) -> ModuleScore:
    """Score one module from its arrays: ``up`` (d × r) and ``down`` (r × k) float64, ``w0``
    (d × k) in the working dtype, and ‖W0‖_F."""
    fields = dict(
        name=module.name, base_key=module.base_key, kind=module.kind, block=module.block,
        layout=module.layout, d=module.d, k=module.k, r=module.r, t=t, scale=module.scale,
        scale_source=module.scale_source, transposed=module.transpose_base, dora=module.dora_key is not None,
    )
    if not math.isfinite(module.scale):  # a NaN/Inf kohya .alpha or config lora_alpha
        return ModuleScore(**{**fields, "scale": None}, finite=False)
    if not (bool(xp.all(xp.isfinite(up))) and bool(xp.all(xp.isfinite(down))) and math.isfinite(base_norm)):
        return ModuleScore(**fields, finite=False)
    spectrum = spectral.update_spectrum(up, down, module.scale, xp=xp)
    if exact:
        basis = spectral.exact_basis(w0, t=t, xp=xp)
    else:
        width = min(t + oversample, module.d, module.k)
        key = (module.k, width, str(w0.dtype))
        if key not in omega_cache:  # Ω depends on the shape only (erratum E4)
            omega_cache[key] = xp.astype(xp.asarray(spectral.gaussian_test_matrix(module.k, width, seed)), w0.dtype)
        omega = omega_cache[key]
        basis = spectral.randomized_basis(w0, omega, t=t, power_iters=power_iters, xp=xp)
    delta_norm = math.sqrt(spectrum.energy)
    sharp = spectral.sharpness(spectrum)
    dev = spectral.deviation(basis, up, spectrum, module.scale, xp=xp)
    mag = spectral.magnitude(delta_norm, base_norm)
    mag_norm = spectral.magnitude_norm(delta_norm, base_norm)
    ddi_raw = sharp * dev * mag
    ddi = ddi_raw if use_raw_magnitude else sharp * dev * mag_norm
    return ModuleScore(
        **fields, finite=True, sharpness=sharp, deviation=dev, magnitude=mag, magnitude_norm=mag_norm,
        ddi=ddi, ddi_raw=ddi_raw, ddi_norm=ddi / (1.0 + ddi), delta_norm=delta_norm, base_norm=base_norm,
    )


def _read_ahead(items, load, *, enabled: bool):
    """Yield ``(item, load(item))``, loading the next item in a thread while the caller
    works on the current one, so reading overlaps computing; at most two are loaded."""
    if not enabled or len(items) < 2:
        for item in items:
            yield item, load(item)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddiscan-read") as pool:
        pending = pool.submit(load, items[0])
        for i, item in enumerate(items):
            current = pending.result()
            pending = pool.submit(load, items[i + 1]) if i + 1 < len(items) else None
            yield item, current
            del current


@contextmanager
def _blas_threads(threads: int | None):
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads, user_api="blas"):
        yield


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def scan(
    base,
    adapter,
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
) -> Report:
    """Score every LoRA-updated module of ``adapter`` against ``base`` by DDI.

    Parameters
    ----------
    base : path-like or TensorIndex
        A ``.safetensors`` file, a sharded checkpoint (directory or ``*.index.json``), or a
        directory holding one.
    adapter : path-like or Adapter
        A ``.safetensors`` adapter file or a PEFT adapter directory.
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
        Read and widen the next base tensor in a thread while the current one is scored.
    progress : bool, default False
        Show a progress bar on stderr.

    Returns
    -------
    Report
        Modules sorted by DDI, highest first.
    """
    if t is not None and t_mult is not None:
        raise UsageError("give --t or --t-mult, not both")
    if t is not None and t < 1:
        raise UsageError("--t must be at least 1")
    if t_mult is not None and not t_mult > 0:
        raise UsageError("--t-mult must be positive")
    if oversample < 0 or power_iters < 0:
        raise UsageError("--oversample and --power-iters must be non-negative")
    if magnitude not in ("bounded", "raw"):
        raise UsageError(f"--magnitude must be 'bounded' or 'raw', not {magnitude!r}")
    for flag, value in (("--alpha", alpha), ("--scaling", scaling)):
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, not {value}")
    if alpha is not None and scaling is not None:
        raise UsageError("give --alpha or --scaling, not both")
    if threads is not None and threads < 1:
        raise UsageError("--threads must be at least 1")
    xp = _array_namespace(device)

    base_index = base if isinstance(base, TensorIndex) else TensorIndex(base)
    adapter_obj = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    modules, skipped, warnings = match_modules(
        adapter_obj, base_index, alpha=alpha, scaling=scaling, allow_unmatched=allow_unmatched
    )

    omega_cache: dict = {}
    scores = []
    dtype = np.float64 if exact else np.float32

    def load(module):
        """Read and widen one module's tensors (runs ahead of the kernels in a thread)."""
        up, down = lora_factors(module, adapter_obj.file)
        w0, norm = widen(base_index.array(module.base_key), dtype)
        return up, down, orient(module, w0), norm

    with _blas_threads(threads):
        loaded = _read_ahead(modules, load, enabled=read_ahead)
        bar = tqdm(loaded, total=len(modules), desc="scanning", unit="module", file=sys.stderr, disable=not progress)
        for module, (up, down, w0, norm) in bar:
            scores.append(score_module(
                module, xp.asarray(up), xp.asarray(down), xp.asarray(w0), norm,
                t=_subspace_size(module, t, t_mult), oversample=oversample, power_iters=power_iters,
                seed=seed, exact=exact, use_raw_magnitude=magnitude == "raw", xp=xp, omega_cache=omega_cache,
            ))
            del up, down, w0
    if any(not s.finite for s in scores):
        names = [s.name for s in scores if not s.finite]
        warnings.append(f"{len(names)} module(s) hold NaN or Inf and are not scored: {', '.join(names[:5])}")

    adapter_path = adapter_obj.file.path
    return Report(
        schema_version=SCHEMA_VERSION,
        ddiscan_version=__version__,
        method="ddi",
        inputs={
            "base": base_index.describe(),
            "adapter": {
                "path": str(adapter_obj.path),
                "file": str(adapter_path),
                "size": adapter_path.stat().st_size,
                "sha256": _sha256(adapter_path),
                "config": adapter_obj.config_source,
            },
        },
        parameters={
            "t": t, "t_mult": t_mult, "oversample": oversample, "power_iters": power_iters,
            "seed": seed, "exact": exact, "magnitude": magnitude, "alpha": alpha, "scaling": scaling,
            "allow_unmatched": allow_unmatched, "device": device, "threads": threads, "eps": spectral.EPS,
        },
        modules=Report.ranked(scores),
        skipped=[{"key": s.key, "reason": s.reason} for s in skipped],
        warnings=warnings,
        summary=summarize(scores),
    )
