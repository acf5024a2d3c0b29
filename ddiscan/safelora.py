"""SafeLoRA's score and rewrite (Hsu et al. [1]_; SPEC.md §7), as pure array functions.

No I/O and no global state; every function that creates arrays takes the array namespace
``xp``, as in :mod:`ddiscan.spectral`. Letters are SPEC.md's: ΔW = s · U · V with U =
``lora_B`` (d × r) and V = ``lora_A`` (r × k); A = W_aligned − W_unaligned (``diff``),
a = ‖A‖_F (``diff_norm``), C = A Aᵀ / a, never formed (every product C·X = A (Aᵀ X) / a
is two passes over A).

References
----------
.. [1] C.-Y. Hsu, Y.-L. Tsai, C.-H. Lin, P.-Y. Chen, C.-M. Yu, C.-Y. Huang, "Safe LoRA:
   the silver lining of reducing safety risks when fine-tuning large language models",
   NeurIPS 2024.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SafeLoraScore", "project_up", "safelora_score", "two_passes", "sumsq", "down_factor"]

@dataclass(frozen=True)
class SafeLoraScore:
    """SafeLoRA's score of one module, and the norms behind it.

    Attributes
    ----------
    cosine : float
        cos(vec(C ΔW), vec(ΔW)) in [0, 1]; 0 when either vector is zero.
    inner : float
        ⟨C ΔW, ΔW⟩_F = s² ‖Aᵀ ΔW / s‖_F² / a (≥ 0).
    projected_norm : float
        ‖C ΔW‖_F.
    delta_norm : float
        ‖ΔW‖_F.
    """

    cosine: float
    inner: float
    projected_norm: float
    delta_norm: float


def transpose(x, xp):
    return xp.linalg.matrix_transpose(x)


def sumsq(x, xp) -> float:
    return float(xp.sum(x * x))


def down_factor(down, xp):
    """R_Vᵀ with Vᵀ = Q_V R_V, so that ‖X · down‖_F = ‖X · R_Vᵀ‖_F for any X."""
    _, r_down = xp.linalg.qr(transpose(down, xp))
    return transpose(r_down, xp)


def two_passes(diff, block, xp):
    """(Aᵀ X, A (Aᵀ X)) for a d × w block X, in A's dtype, widened to float64."""
    wide = xp.astype(block, diff.dtype)
    first = transpose(diff, xp) @ wide
    second = diff @ first
    return xp.astype(first, xp.float64), xp.astype(second, xp.float64)


def project_up(diff, up, *, diff_norm: float, xp):
    """SafeLoRA's rewrite of ``lora_B`` (SPEC.md §7.1): C · U = A (Aᵀ U) / ‖A‖_F, so that ΔW becomes C ΔW.

    ``lora_A`` and the scaling are unchanged. Two passes over A; C is never formed.

    Parameters
    ----------
    diff : array, shape (d, k)
        A = W_aligned − W_unaligned, in the working dtype (float32 or float64).
    up : array, shape (d, r)
        ``lora_B`` (float64).
    diff_norm : float
        ‖A‖_F (from the one-pass widening).
    xp : array namespace

    Returns
    -------
    array, shape (d, r), float64
        C · U; zeros when ``diff_norm`` is 0 (C = 0).
    """
    diff_norm = float(diff_norm)
    if not diff_norm > 0:
        return xp.zeros(up.shape, dtype=xp.float64)
    _, second = two_passes(diff, up, xp)
    return second / diff_norm


def safelora_score(diff, up, down, scale: float, *, diff_norm: float, xp) -> SafeLoraScore:
    """SafeLoRA's similarity of C ΔW and ΔW (SPEC.md §7.1), without forming C or ΔW.

    With P = Aᵀ U (k × r, pass 1), Z = A P = a · C U (d × r, pass 2) and R = R_Vᵀ:

        ⟨C ΔW, ΔW⟩ = s² ‖P R‖² / a,   ‖C ΔW‖ = |s| ‖Z R‖ / a,   ‖ΔW‖ = |s| ‖U R‖,
        cos = ‖P R‖² / (‖Z R‖ · ‖U R‖)        (s and a cancel)

    Parameters
    ----------
    diff : array, shape (d, k)
        A = W_aligned − W_unaligned.
    up : array, shape (d, r)
    down : array, shape (r, k)
    scale : float
    diff_norm : float
        ‖A‖_F.
    xp : array namespace

    Notes
    -----
    Two passes over A of width r: O(d k r); the rest O((d + k) r²). Lowest cosine =
    most misaligned (SPEC.md §7.3).
    """
    diff_norm, scale = float(diff_norm), float(scale)
    r_factor = down_factor(down, xp)
    delta = math.sqrt(sumsq(up @ r_factor, xp)) * abs(scale)
    if not math.isfinite(diff_norm):
        return SafeLoraScore(cosine=math.nan, inner=math.nan, projected_norm=math.nan, delta_norm=delta)
    if not diff_norm > 0:
        return SafeLoraScore(cosine=0.0, inner=0.0, projected_norm=0.0, delta_norm=delta)
    first, second = two_passes(diff, up, xp)
    along = sumsq(first @ r_factor, xp)  # ‖Aᵀ U V‖² = a ⟨C U V, U V⟩
    proj = math.sqrt(sumsq(second @ r_factor, xp))  # a ‖C U V‖
    base = math.sqrt(sumsq(up @ r_factor, xp))  # ‖U V‖
    denominator = proj * base
    # C ΔW below the rounding level of the passes (‖C‖₂ ≤ a): ΔW ⟂ A to working precision
    floor = 8.0 * float(xp.finfo(diff.dtype).eps) * math.sqrt(max(diff.shape)) * diff_norm * base
    cosine = min(1.0, max(0.0, along / denominator)) if proj / diff_norm > floor else 0.0
    if not (math.isfinite(along) and math.isfinite(denominator)):
        cosine = math.nan
    return SafeLoraScore(
        cosine=cosine, inner=scale * scale * along / diff_norm,
        projected_norm=abs(scale) * proj / diff_norm, delta_norm=delta,
    )
