"""The Ritz vectors a range finder returns, and the error bar of O they imply (SPEC.md §2).

References
----------
.. [4] G. W. Stewart, J.-G. Sun, "Matrix Perturbation Theory", 1990 (Davis–Kahan sin Θ theorem).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Ritz", "error_bar", "other_side", "prefix_norms"]


@dataclass(frozen=True)
class Ritz:
    """The top-t Ritz vectors of W0 in a sketched basis, and what their error bar needs.

    Attributes
    ----------
    left : array, shape (d, t)
        Orthonormal Ritz vectors, ordered by Ritz value.
    right : array, shape (k, t) or None
        The matching right basis, span(W0ᵀ left) (only when asked for).
    values : numpy.ndarray, float64
        Every Ritz value θ₁ ≥ … ≥ θ_m of W0 in the basis (m ≥ t).
    residual : float
        ‖R‖₂, R = W0 W0ᵀ X − X Θ_t² for the t Ritz vectors X of the iterated ``side``
        (W0ᵀ W0 on the right side).
    complete : bool
        Whether the basis has min(d, k) columns, so that no singular value lies outside it.
    prefix : numpy.ndarray, float64, shape (t,), optional
        Upper bounds of ‖R[:, :j]‖₂ for j = 1 … t (the last is ``residual``): the residual
        of the top-j Ritz vectors, for the error bar of a smaller t (profiles).
    side : {"left", "right"}
        The singular subspace the kernel iterated on (and whose vectors ``residual`` is of);
        the other side's error bar follows from it by :func:`other_side`.
    """

    left: object
    right: object
    values: np.ndarray
    residual: float
    complete: bool
    prefix: np.ndarray | None = None
    side: str = "left"

    def error_bar(self, t: int | None = None, *, side: str = "left") -> tuple[float | None, float]:
        """(gap, error) of :func:`error_bar` for the top ``t`` (default all) Ritz vectors of
        ``side``: the error bar of O for a basis of that side."""
        t = self.left.shape[1] if t is None else t
        residual = self.residual if self.prefix is None or t == len(self.prefix) else float(self.prefix[t - 1])
        gap, error = error_bar(self.values, residual, t=t, complete=self.complete)
        return gap, error if side == self.side else other_side(error)


def other_side(error: float) -> float:
    """The error bar of the other side's basis, X' = orth(W0ᵀ X) (or orth(W0 X)), from
    ``error`` ≥ ‖sin Θ(X, X_exact)‖₂: tan Θ' ≤ (σ_{t+1}/σ_t) tan Θ ≤ tan Θ, so
    ‖sin Θ'‖₂ ≤ e / √(1 − e²) (SPEC.md §2); 1 where e ≥ 1/√2."""
    if error * error >= 0.5:
        return 1.0
    return min(1.0, error / math.sqrt(1.0 - error * error))


def prefix_norms(gram, norm: float) -> np.ndarray:
    """Upper bounds of ‖R[:, :j]‖₂ (j = 1 … t) from RᵀR (t × t, float64) and ‖R‖₂:
    min(‖R‖₂, ‖R[:, :j]‖_F), the last exactly ‖R‖₂."""
    diagonal = np.clip(np.diagonal(np.asarray(gram, dtype=np.float64)), 0.0, None)
    bounds = np.minimum(np.sqrt(np.cumsum(diagonal)), norm)
    if bounds.size:
        bounds[-1] = norm
    return bounds


def error_bar(values, residual: float, *, t: int, complete: bool) -> tuple[float | None, float]:
    """The gap θ_t / θ_{t+1} and an a-posteriori estimate of |O − O_exact| (SPEC.md §2).

    Whatever ΔW, |O − O_exact| ≤ ‖Q_tQ_tᵀ − U_tU_tᵀ‖₂ = ‖sin Θ(Q_t, U_t)‖₂. Rayleigh–Ritz
    leaves Q_t uncoupled from the other Ritz vectors of the basis, so Q_t's residual R
    (orthogonal to the basis) couples it only to the rest of the space, where W0 W0ᵀ is
    estimated to be at most θ_m², the smallest Ritz value; by the Davis–Kahan theorem [4]_
    ‖sin Θ‖₂ ≤ ‖R‖₂ / (θ_t² − θ_m²) when that estimate holds. It is an estimate, not a
    bound (θ_m underestimates what lies outside; benchmarks/KRYLOV.md and the tests measure
    how often it is exceeded). 1 (nothing known) when θ_t² ≤ θ_m², or when the basis is t
    wide and incomplete; the gap is None where θ_{t+1} is 0 or not seen.
    """
    theta = float(values[t - 1])
    following = float(values[t]) if len(values) > t else None
    gap = theta / following if following else None
    if complete:
        outside = 0.0
    elif following is None:
        return None, 1.0
    else:
        outside = float(values[-1])
    delta = (theta - outside) * (theta + outside)
    if not math.isfinite(residual) or delta <= 0:
        return gap, 1.0
    return gap, min(1.0, residual / delta)
