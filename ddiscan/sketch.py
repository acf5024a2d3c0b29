"""W0's dominant subspace, the one way the scan and ``build_profile`` both compute it
(SPEC.md §2 steps 1–3): block Krylov or subspace iteration (:mod:`ddiscan.krylov`), or a
full SVD with ``exact``; each with the spectral gap and the error bar of O it implies."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import krylov, spectral
from .options import DEFAULT_KRYLOV_ITERS, DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, DEFAULT_SKETCH

__all__ = ["Sketch", "Subspace", "dominant_basis", "dominant_subspace"]


@dataclass(frozen=True, kw_only=True)
class Sketch:
    """How Q_t is found: the ``kernel`` ("krylov" or "subspace"), ``oversample`` extra
    columns q of Ω (the block is t + q wide), ``krylov_iters`` or ``power_iters``
    iterations, the seed of Ω, or ``exact`` (full SVD)."""

    oversample: int = DEFAULT_OVERSAMPLE
    power_iters: int = DEFAULT_POWER_ITERS
    seed: int = 0
    exact: bool = False
    kernel: str = DEFAULT_SKETCH
    krylov_iters: int = DEFAULT_KRYLOV_ITERS


@dataclass(frozen=True)
class Subspace:
    """Q_t (d × t) with what the sketch saw of it: the gap σ_t / σ_{t+1} estimated from
    the Ritz values (None where σ_{t+1} is 0 or unseen) and the error bar of O
    (:func:`ddiscan.krylov.error_bar`; 0 for ``exact``, None where unknown)."""

    basis: object
    gap: float | None = None
    error: float | None = None


def dominant_subspace(w0, *, t: int, sketch: Sketch, xp, right: bool = False,
                      omegas: dict | None = None) -> tuple[krylov.Ritz, Subspace]:
    """The Ritz vectors of ``w0`` (d × k) (with ``right``, also the right basis) and the
    :class:`Subspace` of their left basis.

    Ω is a function of (seed, k, width) only (erratum E4), so ``omegas``, when given, keeps
    it per (k, width, dtype) for the next weight of that shape.
    """
    ritz = _fit(w0, t=t, sketch=sketch, xp=xp, right=right, omegas=omegas)
    gap, error = ritz.error_bar()
    return ritz, Subspace(ritz.left, gap, 0.0 if sketch.exact else error)


def dominant_basis(w0, *, t: int, sketch: Sketch, xp, right: bool = False, omegas: dict | None = None):
    """Q_t (d × t) of ``w0`` (d × k); with ``right``, the pair (left, right (k × t))."""
    ritz, _ = dominant_subspace(w0, t=t, sketch=sketch, xp=xp, right=right, omegas=omegas)
    return (ritz.left, ritz.right) if right else ritz.left


def _fit(w0, *, t: int, sketch: Sketch, xp, right: bool, omegas: dict | None) -> krylov.Ritz:
    if sketch.exact:
        left, values, right_t = xp.linalg.svd(w0, full_matrices=False)
        other = xp.linalg.matrix_transpose(right_t[:t, :]) if right else None
        values = np.asarray(values.get() if hasattr(values, "get") else values, dtype=np.float64)
        return krylov.Ritz(left=left[:, :t], right=other, values=values, residual=0.0, complete=True)
    d, k = w0.shape
    width = min(t + sketch.oversample, d, k)
    rows = max(d, k) if sketch.kernel == "krylov" else k  # block Krylov runs on the smaller side
    shape = (rows, width, str(w0.dtype))
    cache = {} if omegas is None else omegas
    if shape not in cache:
        cache[shape] = xp.astype(xp.asarray(spectral.gaussian_test_matrix(rows, width, sketch.seed)), w0.dtype)
    if sketch.kernel == "krylov":
        return krylov.block_krylov(w0, cache[shape], t=t, iters=sketch.krylov_iters, xp=xp, right=right)
    return krylov.subspace_iteration(w0, cache[shape], t=t, power_iters=sketch.power_iters, xp=xp, right=right)
