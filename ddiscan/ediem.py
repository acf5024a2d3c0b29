"""SPLoRA's E-DIEM (Ao et al. [1]_, DIEM of Tessari & Hogan [2]_; SPEC.md §7.2), as a pure
array function, against a reference of Haar rotations of ΔW. Letters as in
:mod:`ddiscan.safelora`.

References
----------
.. [1] S. Ao, Y. Dong, J. Hu, S. D. Ramchurn, "Safe Pruning LoRA: robust distance-guided
   pruning for safety alignment in adaptation of LLMs", TACL 13, 2025, pp. 1474–1487.
.. [2] F. Tessari, N. Hogan, "Surpassing cosine similarity for multidimensional
   comparisons: dimension insensitive Euclidean metric (DIEM)", arXiv:2407.08623, 2024.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .safelora import down_factor, sumsq, transpose, two_passes

__all__ = ["EDiemScore", "ediem_score", "reference_probes"]

@dataclass(frozen=True)
class EDiemScore:
    """SPLoRA's E-DIEM of one module against its rotation reference.

    Attributes
    ----------
    score : float
        (distance − mean) / std; 0 when the reference does not spread. Higher = C ΔW
        farther from ΔW than for randomly oriented updates = more "misaligned".
    distance : float
        d(C ΔW, ΔW) = ‖C ΔW − ΔW‖_F.
    mean, std : float
        Mean and standard deviation (ddof = 1) of the reference distances ‖C H_j ΔW − H_j ΔW‖_F.
    samples : int
        Number of reference rotations.
    """

    score: float
    distance: float
    mean: float
    std: float
    samples: int


def reference_probes(d: int, width: int, samples: int, seed: int) -> np.ndarray:
    """The Gaussian blocks G_j behind E-DIEM's rotations: shape (samples, d, width), float64.

    A function of (seed, d, width) and the sample index only: modules of one shape share
    them, and the first n blocks are the same whatever ``samples`` is.
    """
    rng = np.random.default_rng([seed, d, width])
    return rng.standard_normal((samples, d, width))


def _observed(first, second, up, r_factor, diff_norm: float, xp):
    """The observed update's distance d (from the d × r residual: no cancellation when
    C ΔW ≈ ΔW), ‖Aᵀ…‖², ‖A Aᵀ…‖² and d² − ‖Y‖² (SPEC.md §7.2)."""
    along = sumsq(first @ r_factor, xp)
    proj = sumsq(second @ r_factor, xp)
    excess = proj / diff_norm**2 - 2.0 * along / diff_norm  # d² − ‖Y‖²
    observed = math.sqrt(sumsq((second / diff_norm - up) @ r_factor, xp))
    return observed, along, proj, excess


def _reference(first, second, probes, core, diff_norm: float, xp) -> dict:
    """The reference rotations' distances d_j, g_j = d_j² − ‖Y‖² and the size of g_j's
    terms: T_j = R_j⁻¹ K with R_j the Cholesky factor of G_jᵀ G_j, Q_j = G_j R_j⁻¹."""
    samples, d, m = probes.shape
    gram = transpose(probes, xp) @ probes  # (n, m, m)
    upper = transpose(xp.linalg.cholesky(gram), xp)
    turn = xp.linalg.inv(upper) @ core  # (n, m, m')
    first_j = xp.permute_dims(xp.reshape(first, (first.shape[0], samples, m)), (1, 0, 2))
    second_j = xp.permute_dims(xp.reshape(second, (d, samples, m)), (1, 0, 2))
    moved = (second_j / diff_norm - probes) @ turn  # (C − I) Q_j K
    first_j = first_j @ turn
    second_j = second_j @ turn
    along_j = xp.sum(xp.reshape(first_j * first_j, (samples, -1)), axis=1)
    proj_j = xp.sum(xp.reshape(second_j * second_j, (samples, -1)), axis=1)
    return {
        "excess": proj_j / diff_norm**2 - 2.0 * along_j / diff_norm,
        "distances": xp.sqrt(xp.sum(xp.reshape(moved * moved, (samples, -1)), axis=1)),
        "size": proj_j / diff_norm**2 + 2.0 * along_j / diff_norm,
    }


def _standardised(gap_mean: float, gap_std: float, observed: float, ref: dict, diff, xp) -> float:
    """−mean/std of d_j − d; 0 where the spread is at rounding level (the same distance for
    every rotation: d = 1, C ∝ I); NaN where anything is not finite."""
    d, k = diff.shape
    noise = 16.0 * float(xp.finfo(diff.dtype).eps) * math.sqrt(max(d, k)) * float(xp.max(ref["size"]))
    spread = float(xp.std(ref["excess"], correction=1))
    if not all(math.isfinite(v) for v in (gap_mean, gap_std, observed, spread)):
        return math.nan
    if spread <= noise or gap_std == 0.0:
        return 0.0
    return -gap_mean / gap_std


def ediem_score(diff, up, down, scale: float, *, diff_norm: float, samples: int = 32, seed: int = 0,
                xp) -> EDiemScore:
    """SPLoRA's E-DIEM of X = C ΔW and Y = ΔW against Haar rotations of ΔW (SPEC.md §7.2).

    Parameters
    ----------
    diff : array, shape (d, k)
        A = W_aligned − W_unaligned.
    up, down : arrays, shapes (d, r) and (r, k)
    scale : float
    diff_norm : float
        ‖A‖_F.
    samples, seed : int
        Number n (≥ 2) and seed of the reference rotations (:func:`reference_probes`).
    xp : array namespace

    Returns
    -------
    EDiemScore
        Highest score = most misaligned (SPEC.md §7.3). The score does not
        depend on s (distances scale by |s|) nor on the sign of ΔW; it does depend on a.

    Notes
    -----
    Two passes over A of width r + n·min(d, r); the distances and their rounding: SPEC.md §7.2.
    """
    if samples < 2:
        raise ValueError("E-DIEM needs at least 2 reference samples")
    diff_norm, scale = float(diff_norm), float(scale)
    d, m = up.shape[0], min(up.shape)
    r_factor = down_factor(down, xp)  # r × min(k, r)
    _, r_up = xp.linalg.qr(up)  # m × r
    core = r_up @ r_factor  # K, m × min(k, r)
    energy = sumsq(core, xp)  # ‖ΔW‖² / s²
    distance = math.sqrt(energy)
    if not (math.isfinite(diff_norm) and math.isfinite(energy)):
        return EDiemScore(score=math.nan, distance=math.nan, mean=math.nan, std=math.nan, samples=samples)
    if not diff_norm > 0 or energy == 0.0:  # C = 0 or ΔW = 0: every distance is ‖ΔW‖
        plain = abs(scale) * distance
        return EDiemScore(score=0.0, distance=plain, mean=plain, std=0.0, samples=samples)

    probes = xp.asarray(reference_probes(d, m, samples, seed))
    probes = xp.astype(xp.astype(probes, diff.dtype), xp.float64)  # the values the passes see
    block = xp.concat([up, xp.reshape(xp.permute_dims(probes, (1, 0, 2)), (d, samples * m))], axis=1)
    first, second = two_passes(diff, block, xp)
    r = up.shape[1]
    observed, along, proj, excess = _observed(first[:, :r], second[:, :r], up, r_factor, diff_norm, xp)
    ref = _reference(first[:, r:], second[:, r:], probes, core, diff_norm, xp)
    # d_j − d two ways, each where its rounding error is the smaller: directly (error ~ ε‖Y‖),
    # or as (g_j − g) / (d_j + d) (error ~ ε (|terms of g_j| + |terms of g|) / (d_j + d))
    terms = ref["size"] + (proj / diff_norm**2 + 2.0 * along / diff_norm)
    total = ref["distances"] + observed
    via_g = xp.where(total > 0, ref["excess"] - excess, 0.0) / xp.where(total > 0, total, 1.0)
    gap = xp.where(terms < total * distance, via_g, ref["distances"] - observed)
    gap_mean = float(xp.mean(gap))
    gap_std = float(xp.std(gap, correction=1))
    score = _standardised(gap_mean, gap_std, observed, ref, diff, xp)
    s = abs(scale)
    return EDiemScore(score=score, distance=s * observed, mean=s * (observed + gap_mean), std=s * gap_std,
                      samples=samples)
