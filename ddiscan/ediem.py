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


def ediem_score(diff, up, down, scale: float, *, diff_norm: float, samples: int = 32, seed: int = 0,
                xp) -> EDiemScore:
    """SPLoRA's E-DIEM of X = C ΔW and Y = ΔW against Haar rotations of ΔW (SPEC.md §7.2).

    Parameters
    ----------
    diff : array, shape (d, k)
        A = W_aligned − W_unaligned.
    up : array, shape (d, r)
    down : array, shape (r, k)
    scale : float
    diff_norm : float
        ‖A‖_F.
    samples : int
        Number of reference rotations n (≥ 2).
    seed : int
        Seed of the rotations (:func:`reference_probes`).
    xp : array namespace

    Returns
    -------
    EDiemScore
        Highest score = most misaligned (SPEC.md §7.3). The score does not
        depend on s (distances scale by |s|) nor on the sign of ΔW; it does depend on a.

    Notes
    -----
    Two passes over A of width r + n·min(d, r): O(d k (r + n m)); memory (d + k)(r + n m)
    numbers. Per sample j, with T_j = R_j⁻¹ K and m = min(d, r),

        d_j = ‖(A Aᵀ G_j / a − G_j) T_j‖_F,
        d_j² − ‖Y‖² = ‖(A Aᵀ G_j) T_j‖² / a² − 2 ‖(Aᵀ G_j) T_j‖² / a  =: g_j,

    and the same for the observed update with U R_Vᵀ in place of G_j T_j. The spread is
    taken from d_j − d = (g_j − g) / (d_j + d) where that carries less rounding than the
    plain difference — for a small C, whose d_j differ from ‖ΔW‖ in their fifth digit or
    later — and from d_j − d itself where C ΔW ≈ ΔW.
    """
    if samples < 2:
        raise ValueError("E-DIEM needs at least 2 reference samples")
    diff_norm, scale = float(diff_norm), float(scale)
    d = up.shape[0]
    m = min(d, up.shape[1])
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

    # the observed update: d from the d × r residual (no cancellation when C ΔW ≈ ΔW)
    along = sumsq(first[:, :r] @ r_factor, xp)
    proj = sumsq(second[:, :r] @ r_factor, xp)
    excess = proj / diff_norm**2 - 2.0 * along / diff_norm  # d² − ‖Y‖²
    observed = math.sqrt(sumsq((second[:, :r] / diff_norm - up) @ r_factor, xp))

    # the reference: T_j = R_j⁻¹ K with R_j the Cholesky factor of G_jᵀ G_j, Q_j = G_j R_j⁻¹
    gram = transpose(probes, xp) @ probes  # (n, m, m)
    upper = transpose(xp.linalg.cholesky(gram), xp)
    turn = xp.linalg.inv(upper) @ core  # (n, m, m')
    first_j = xp.permute_dims(xp.reshape(first[:, r:], (first.shape[0], samples, m)), (1, 0, 2))
    second_j = xp.permute_dims(xp.reshape(second[:, r:], (d, samples, m)), (1, 0, 2))
    moved = (second_j / diff_norm - probes) @ turn  # (C − I) Q_j K
    first_j = first_j @ turn
    second_j = second_j @ turn
    along_j = xp.sum(xp.reshape(first_j * first_j, (samples, -1)), axis=1)
    proj_j = xp.sum(xp.reshape(second_j * second_j, (samples, -1)), axis=1)
    excess_j = proj_j / diff_norm**2 - 2.0 * along_j / diff_norm
    distances = xp.sqrt(xp.sum(xp.reshape(moved * moved, (samples, -1)), axis=1))
    # d_j − d two ways, each where its rounding error is the smaller: directly (error ~ ε‖Y‖),
    # or as (g_j − g) / (d_j + d) (error ~ ε (|terms of g_j| + |terms of g|) / (d_j + d))
    size = proj_j / diff_norm**2 + 2.0 * along_j / diff_norm
    terms = size + (proj / diff_norm**2 + 2.0 * along / diff_norm)
    total = distances + observed
    via_g = xp.where(total > 0, excess_j - excess, 0.0) / xp.where(total > 0, total, 1.0)
    gap = xp.where(terms < total * distance, via_g, distances - observed)
    gap_mean = float(xp.mean(gap))
    gap_std = float(xp.std(gap, correction=1))

    # rounding-level spread: the same distance for every rotation (d = 1, C ∝ I)
    noise = 16.0 * float(xp.finfo(diff.dtype).eps) * math.sqrt(max(d, diff.shape[1])) * float(xp.max(size))
    spread = float(xp.std(excess_j, correction=1))
    if not all(math.isfinite(v) for v in (gap_mean, gap_std, observed, spread)):
        score = math.nan
    elif spread <= noise or gap_std == 0.0:
        score = 0.0
    else:
        score = -gap_mean / gap_std
    s = abs(scale)
    return EDiemScore(score=score, distance=s * observed, mean=s * (observed + gap_mean), std=s * gap_std,
                      samples=samples)
