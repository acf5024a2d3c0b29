"""W0's dominant subspace, the one way the scan and ``build_profile`` both compute it
(SPEC.md §2 steps 1–3): the randomized range finder, or a full SVD with ``exact``."""

from __future__ import annotations

from dataclasses import dataclass

from . import spectral
from .options import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS

__all__ = ["Sketch", "dominant_basis"]


@dataclass(frozen=True, kw_only=True)
class Sketch:
    """How Q_t is found: ``oversample`` extra columns q of Ω, ``power_iters`` power
    iterations, the seed of Ω, or ``exact`` (full SVD)."""

    oversample: int = DEFAULT_OVERSAMPLE
    power_iters: int = DEFAULT_POWER_ITERS
    seed: int = 0
    exact: bool = False


def dominant_basis(w0, *, t: int, sketch: Sketch, xp, right: bool = False, omegas: dict | None = None):
    """Q_t (d × t) of ``w0`` (d × k); with ``right``, the pair (left, right (k × t)).

    Ω is a function of (seed, k, width) only (erratum E4), so ``omegas``, when given, keeps
    it per (k, width, dtype) for the next weight of that shape.
    """
    if sketch.exact:
        return spectral.exact_basis(w0, t=t, xp=xp, right=right)
    d, k = w0.shape
    width = min(t + sketch.oversample, d, k)
    shape = (k, width, str(w0.dtype))
    cache = {} if omegas is None else omegas
    if shape not in cache:
        cache[shape] = xp.astype(xp.asarray(spectral.gaussian_test_matrix(k, width, sketch.seed)), w0.dtype)
    return spectral.randomized_basis(w0, cache[shape], t=t, power_iters=sketch.power_iters, xp=xp, right=right)
