"""What a base profile keeps of each weight's Ritz values, so that a scan against it has the
error bar of O a scan against the base has (SPEC.md §2), for every t up to the stored one.

The error bar of the top-j Ritz vectors reads θ_j, θ_{j+1}, the smallest Ritz value θ_m,
the residual bound of the first j columns, whether the basis was complete and which side
the kernel iterated on (:meth:`ddiscan.krylov.Ritz.error_bar`). For a weight stored with
T columns that is three fixed-size tensors, laid out before the weight is sketched:

* ``<key>:ritz`` (F64, T + 2): θ_1 … θ_{T+1}, θ_m (θ_{T+1} repeats θ_T where m = T);
* ``<key>:residuals`` (F64, T): upper bounds of ‖R[:, :j]‖₂, j = 1 … T (zeros with exact);
* ``<key>:ritz_info`` (I64, 3): m, complete (0 or 1), the side (0 left, 1 right).
"""

from __future__ import annotations

import numpy as np

from .krylov import Ritz

__all__ = ["SIDES", "specs", "packed", "unpacked"]

SIDES = ("left", "right")
_LARGEST = np.finfo(np.float64).max  # a residual that is not finite: the error bar is 1 either way


def specs(key: str, t: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """The (name, dtype, shape) of the tensors that hold ``key``'s Ritz values (``t`` stored columns)."""
    return [(f"{key}:ritz", "F64", (t + 2,)), (f"{key}:residuals", "F64", (t,)), (f"{key}:ritz_info", "I64", (3,))]


def packed(ritz: Ritz | None, t: int, *, complete: bool = False) -> dict[str, np.ndarray]:
    """The arrays of :func:`specs` for the top-``t`` Ritz vectors of ``ritz``; zeros (m = t,
    ``complete`` as given) for None, a weight that was not sketched (NaN or Inf)."""
    if ritz is None:
        return {"ritz": np.zeros(t + 2), "residuals": np.zeros(t), "ritz_info": np.array([t, int(complete), 0])}
    values = np.asarray(ritz.values, dtype=np.float64)
    following = values[t] if values.size > t else values[t - 1]
    prefix = np.zeros(t) if ritz.prefix is None else np.asarray(ritz.prefix, dtype=np.float64)[:t]
    return {"ritz": np.concatenate([values[:t], [following, values[-1]]]),
            "residuals": np.where(np.isfinite(prefix), prefix, _LARGEST),
            "ritz_info": np.array([values.size, int(ritz.complete), SIDES.index(ritz.side)])}


def unpacked(values, residuals, info) -> Ritz:
    """The :class:`~ddiscan.krylov.Ritz` (without vectors) that :func:`packed` stored, whose
    ``error_bar(j, side=...)`` is the error bar of its top-j vectors of either side."""
    t = residuals.shape[0]
    count, complete, side = (int(n) for n in info)
    values = np.asarray(values, dtype=np.float64)
    return Ritz(left=None, right=None, values=values if count > t else values[:t],
                residual=float(residuals[-1]), complete=bool(complete),
                prefix=np.asarray(residuals, dtype=np.float64), side=SIDES[side])
