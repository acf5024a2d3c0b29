"""The other scorers of the DDI paper's comparison — SafeLoRA, SPLoRA's E-DIEM — and DDI's
component ablation, as pure array functions (issue 9).

No I/O and no global state; like :mod:`ddiscan.spectral`, every function that creates
arrays takes the array namespace ``xp`` (``numpy``, ``cupy`` through ``array_api_compat``,
or any namespace of the Python array API standard).

Letters
-------
ΔW = s · U · L with U = ``lora_B`` (d × r) and L = ``lora_A`` (r × k), as in SPEC.md §1
(``up`` and ``down`` below). A = W_aligned − W_unaligned (d × k, ``diff``) is the
"alignment update" of the module's weight, a = ‖A‖_F (``diff_norm``), and

    C = A Aᵀ / a                                                     (d × d, never formed)

is SafeLoRA's "alignment matrix". C is symmetric positive semi-definite but **not** a
projector: its eigenvalues are σᵢ(A)² / a, all below 1 only when σ₁(A)² < a (e.g. whenever
a < 1), and C·ΔW may be longer than ΔW. For A = 0 we take C = 0, the continuous extension
(‖C‖_F ≤ a).

Nothing d × d or d × k is formed. Every product with C is C·X = A (Aᵀ X) / a, so a score
costs two passes over A (``Aᵀ·`` then ``A·``) with blocks of width r (SafeLoRA) or
r + samples·min(d, r) (E-DIEM); everything else is on r × r matrices. Products with A run
in A's dtype (float32 from the scan: no float64 copy of A) and are widened to float64;
the rest is float64. Writing Lᵀ = Q_L R_L (thin QR), ‖X L‖_F = ‖X R_Lᵀ‖_F for any X, so
every Frobenius norm below is a sum of squares of a small matrix, never a trace of a
product of Grams (no cancellation).

SafeLoRA (Hsu et al. [1]_)
--------------------------
Score: cos(vec(C ΔW), vec(ΔW)) ∈ [0, 1] (C is PSD, so it is never negative). Modules with
the **lowest** cosine are the ones whose update points away from the alignment subspace;
SafeLoRA rewrites them as ``lora_B ← C · lora_B`` (ΔW ← C ΔW). The cosine does not depend
on s, on a, or on the sign of ΔW.

SPLoRA's E-DIEM (Ao et al. [2]_, DIEM of Tessari & Hogan [3]_)
---------------------------------------------------------------
DIEM compares the distance d(X, Y) of two vectors with the distribution of distances of
*random* vectors: DIEM = (v_M − v_m)/σ² · (d − E[d]). SPLoRA's E-DIEM takes X = C ΔW and
Y = ΔW and estimates E[d] and σ from an "empirical" reference distribution; the public
code's reference is 50 copies of the same pair, so its spread is its 1e-6 guard and the
score is rounding noise. The public code's E-DIEM is, after a min-max rescaling that
cancels, the standardized distance (d − Ê[d]) / σ̂; ddiscan keeps that form — the range
prefactor v_M − v_m is the spread of the entries of X and Y, which has no low-rank
expression — and gives it a real reference distribution:

    Y_j = H_j ΔW,  X_j = C Y_j,  d_j = ‖X_j − Y_j‖_F,  H_j Haar-random in O(d), j = 1..n

"How far would C·ΔW be from ΔW if this update, with exactly its singular values and row
space, pointed in a random direction of the output space?" Then

    E-DIEM = (d(C ΔW, ΔW) − mean_j d_j) / std_j d_j           (std with ddof = 1)

**Why this reference.** It keeps what X and Y are — X = C Y for the same C, Y with the
module's spectrum — and randomises only what the score is about: where Y lies relative to
the alignment subspace. The cheaper nulls that randomise X against Y (sign flips of X's
components, rotations of X's rank-r factor space, X_O = X Q_L O Q_Lᵀ) cannot work: X = C Y
is always positively coupled to Y (⟨C Y, Y⟩ ≥ 0), a decoupled X_O has E⟨X_O, Y⟩ = 0, so
the observed distance is always below the reference mean: for a small C the score is
about −√r · tr(M)/‖M‖_F with M = (C Y)ᵀ Y in the factor basis, a PSD r × r matrix — a
number between −r and −√r that measures M's effective rank, not alignment (for r = 1 the
null is two points and the score is −1 for every module; for r = 4 a quick check gave
−4.2 for an update orthogonal to A and −7.0 for one inside it). Rotating Y in the output
space does not change ‖Y‖ (so d_j − d only involves the terms with C) and reduces to
small matrices: with U = Q_U R_U and K = R_U R_Lᵀ (min(d, r) × min(k, r)),
H_j ΔW ≅ s Q_j K, Q_j = H_j Q_U uniform on the Stiefel manifold. Q_j = G_j R_j⁻¹ with
G_j a Gaussian d × min(d, r) block and R_j the Cholesky factor of G_jᵀ G_j (the QR with a
positive diagonal, hence exactly Haar); C Q_j = A (Aᵀ G_j) R_j⁻¹ / a, so all n blocks ride
in the same two passes over A as U. The G_j depend on (seed, d, min(d, r)) only — modules
of one shape share them (common random numbers), the scan order does not matter, and the
first n samples do not change when more are asked for.

**Direction.** E-DIEM is a distance: the **highest** scores are the modules whose C ΔW is
farthest from ΔW relative to random orientations — SafeLoRA's "lowest similarity", and
what ddiscan selects. (The public code prunes ``score <= threshold``, the lowest; with its
noise score the direction had no effect.) When C's eigenvalues are below 1 this ranks the
updates least inside the alignment subspace first, as SafeLoRA's cosine does; when
σ₁(A)²/a > 2, an update *inside* the subspace is moved farther than a random one
(d = |λ − 1|·‖ΔW‖) and the direction flips — a property of comparing C ΔW with ΔW when C
is not a projector, which SafeLoRA's scale-free cosine does not have.

**Blind spots.** Both scores are even functions of ΔW: an update that undoes the
alignment (ΔW ≈ −A) scores exactly as one that reinforces it (ΔW ≈ +A), and both look
*aligned*. DDI is even in ΔW too. tests/test_methods.py plants both.

Degenerate cases
----------------
* cosine: 0 when C ΔW or ΔW is the zero vector (ΔW = 0, A = 0 or a = 0, or ΔW ⟂ A's
  column space) — torch's ``cosine_similarity``, which the public code uses, also gives
  0; "zero" for C ΔW means below the rounding level of the passes,
  ‖C ΔW‖ ≤ 8 ε √max(d, k) · a · ‖ΔW‖ (ε of A's dtype; ‖C‖₂ ≤ a), where any cosine would
  be a ratio of rounding errors. The cosine is clamped to [0, 1].
* E-DIEM: 0 when the reference distances do not spread beyond rounding (ΔW = 0, A = 0,
  d = 1, or C a multiple of the identity): there is nothing to compare with. ``std`` is
  reported as computed.
* Non-finite inputs give non-finite outputs; the scan marks such modules (as for DDI).

References
----------
.. [1] C.-Y. Hsu, Y.-L. Tsai, C.-H. Lin, P.-Y. Chen, C.-M. Yu, C.-Y. Huang, "Safe LoRA:
   the silver lining of reducing safety risks when fine-tuning large language models",
   NeurIPS 2024.
.. [2] S. Ao, Y. Dong, J. Hu, S. D. Ramchurn, "Safe Pruning LoRA: robust distance-guided
   pruning for safety alignment in adaptation of LLMs", TACL 13, 2025, pp. 1474–1487.
.. [3] F. Tessari, N. Hogan, "Surpassing cosine similarity for multidimensional
   comparisons: dimension insensitive Euclidean metric (DIEM)", arXiv:2407.08623, 2024.
.. [4] S. Ao, S. D. Ramchurn, "Safe and deployable LLM adaptation: directional deviation
   index–guided model pruning" (the DDI paper; its ablation scores subsets of S, O, M).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

__all__ = [
    "SafeLoraScore",
    "EDiemScore",
    "project_up",
    "safelora_score",
    "ediem_score",
    "reference_probes",
    "select_lowest",
    "select_highest",
    "COMPONENTS",
    "parse_components",
    "components",
]

COMPONENTS = ("S", "O", "M")


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


# ---------------------------------------------------------------------------------------
# Shared pieces


def _transpose(x, xp):
    return xp.linalg.matrix_transpose(x)


def _sumsq(x, xp) -> float:
    return float(xp.sum(x * x))


def _down_factor(down, xp):
    """R_Lᵀ with Lᵀ = Q_L R_L, so that ‖X · down‖_F = ‖X · R_Lᵀ‖_F for any X."""
    _, r_down = xp.linalg.qr(_transpose(down, xp))
    return _transpose(r_down, xp)


def _two_passes(diff, block, xp):
    """(Aᵀ X, A (Aᵀ X)) for a d × w block X, in A's dtype, widened to float64."""
    wide = xp.astype(block, diff.dtype)
    first = _transpose(diff, xp) @ wide
    second = diff @ first
    return xp.astype(first, xp.float64), xp.astype(second, xp.float64)


def project_up(diff, up, *, diff_norm: float, xp):
    """SafeLoRA's rewrite of ``lora_B``: C · U = A (Aᵀ U) / ‖A‖_F, so that ΔW becomes C ΔW.

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
    _, second = _two_passes(diff, up, xp)
    return second / diff_norm


def safelora_score(diff, up, down, scale: float, *, diff_norm: float, xp) -> SafeLoraScore:
    """SafeLoRA's similarity of C ΔW and ΔW (Hsu et al. 2024 [1]_), without forming C or ΔW.

    With P = Aᵀ U (k × r, pass 1), Z = A P = a · C U (d × r, pass 2) and R = R_Lᵀ:

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
    most misaligned (:func:`select_lowest`).
    """
    diff_norm, scale = float(diff_norm), float(scale)
    r_factor = _down_factor(down, xp)
    delta = math.sqrt(_sumsq(up @ r_factor, xp)) * abs(scale)
    if not math.isfinite(diff_norm):
        return SafeLoraScore(cosine=math.nan, inner=math.nan, projected_norm=math.nan, delta_norm=delta)
    if not diff_norm > 0:
        return SafeLoraScore(cosine=0.0, inner=0.0, projected_norm=0.0, delta_norm=delta)
    first, second = _two_passes(diff, up, xp)
    along = _sumsq(first @ r_factor, xp)  # ‖Aᵀ U L‖² = a ⟨C U L, U L⟩
    proj = math.sqrt(_sumsq(second @ r_factor, xp))  # a ‖C U L‖
    base = math.sqrt(_sumsq(up @ r_factor, xp))  # ‖U L‖
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


def reference_probes(d: int, width: int, samples: int, seed: int) -> np.ndarray:
    """The Gaussian blocks G_j behind E-DIEM's rotations: shape (samples, d, width), float64.

    A function of (seed, d, width) and the sample index only: modules of one shape share
    them, and the first n blocks are the same whatever ``samples`` is.
    """
    rng = np.random.default_rng([seed, d, width])
    return rng.standard_normal((samples, d, width))


def ediem_score(diff, up, down, scale: float, *, diff_norm: float, samples: int = 32, seed: int = 0,
                xp) -> EDiemScore:
    """SPLoRA's E-DIEM of X = C ΔW and Y = ΔW against Haar rotations of ΔW (module docstring).

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
        Highest score = most misaligned (:func:`select_highest`). The score does not
        depend on s (distances scale by |s|) nor on the sign of ΔW; it does depend on a.

    Notes
    -----
    Two passes over A of width r + n·min(d, r): O(d k (r + n m)); memory (d + k)(r + n m)
    numbers. Per sample j, with T_j = R_j⁻¹ K and m = min(d, r),

        d_j = ‖(A Aᵀ G_j / a − G_j) T_j‖_F,
        d_j² − ‖Y‖² = ‖(A Aᵀ G_j) T_j‖² / a² − 2 ‖(Aᵀ G_j) T_j‖² / a  =: g_j,

    and the same for the observed update with U R_Lᵀ in place of G_j T_j. The spread is
    taken from d_j − d = (g_j − g) / (d_j + d) where that carries less rounding than the
    plain difference — for a small C, whose d_j differ from ‖ΔW‖ in their fifth digit or
    later — and from d_j − d itself where C ΔW ≈ ΔW.
    """
    if samples < 2:
        raise ValueError("E-DIEM needs at least 2 reference samples")
    diff_norm, scale = float(diff_norm), float(scale)
    d = up.shape[0]
    m = min(d, up.shape[1])
    r_factor = _down_factor(down, xp)  # r × min(k, r)
    _, r_up = xp.linalg.qr(up)  # m × r
    core = r_up @ r_factor  # K, m × min(k, r)
    energy = _sumsq(core, xp)  # ‖ΔW‖² / s²
    distance = math.sqrt(energy)
    if not (math.isfinite(diff_norm) and math.isfinite(energy)):
        return EDiemScore(score=math.nan, distance=math.nan, mean=math.nan, std=math.nan, samples=samples)
    if not diff_norm > 0 or energy == 0.0:  # C = 0 or ΔW = 0: every distance is ‖ΔW‖
        plain = abs(scale) * distance
        return EDiemScore(score=0.0, distance=plain, mean=plain, std=0.0, samples=samples)

    probes = xp.asarray(reference_probes(d, m, samples, seed))
    probes = xp.astype(xp.astype(probes, diff.dtype), xp.float64)  # the values the passes see
    block = xp.concat([up, xp.reshape(xp.permute_dims(probes, (1, 0, 2)), (d, samples * m))], axis=1)
    first, second = _two_passes(diff, block, xp)
    r = up.shape[1]

    # the observed update: d from the d × r residual (no cancellation when C ΔW ≈ ΔW)
    along = _sumsq(first[:, :r] @ r_factor, xp)
    proj = _sumsq(second[:, :r] @ r_factor, xp)
    excess = proj / diff_norm**2 - 2.0 * along / diff_norm  # d² − ‖Y‖²
    observed = math.sqrt(_sumsq((second[:, :r] / diff_norm - up) @ r_factor, xp))

    # the reference: T_j = R_j⁻¹ K with R_j the Cholesky factor of G_jᵀ G_j, Q_j = G_j R_j⁻¹
    gram = _transpose(probes, xp) @ probes  # (n, m, m)
    upper = _transpose(xp.linalg.cholesky(gram), xp)
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


# ---------------------------------------------------------------------------------------
# Selection


def _finite_pairs(scores) -> list[tuple[str, float]]:
    items = scores.items() if isinstance(scores, Mapping) else scores
    return [(str(name), float(value)) for name, value in items
            if value is not None and math.isfinite(float(value))]


def select_lowest(scores: Mapping[str, float] | Iterable[tuple[str, float]], *, count: int | None = None,
                  threshold: float | None = None) -> list[str]:
    """The modules with the lowest scores: SafeLoRA's selection (lowest cosine first).

    Exactly one rule: the ``count`` lowest (ascending by score, ties broken by name; the
    public SafeLoRA code's lowest-k rule, which takes every score ≤ the k-th lowest and
    so selects more than k on ties), or every score ≤ ``threshold`` (the public code's
    ``cos <= threshold``, default there 0.5). Non-finite scores are never selected.

    Returns
    -------
    list of str
        Names, lowest score first.
    """
    if (count is None) == (threshold is None):
        raise ValueError("give exactly one of count, threshold")
    ranked = sorted(_finite_pairs(scores), key=lambda p: (p[1], p[0]))
    if count is not None:
        if count < 0:
            raise ValueError("count must be non-negative")
        return [name for name, _ in ranked[: int(count)]]
    return [name for name, value in ranked if value <= threshold]


def select_highest(scores: Mapping[str, float] | Iterable[tuple[str, float]], *, count: int | None = None,
                   threshold: float | None = None) -> list[str]:
    """The modules with the highest scores: E-DIEM's selection (farthest C ΔW first).

    ``count`` highest (descending, ties broken by name) or every score ≥ ``threshold``;
    non-finite scores are never selected.
    """
    if (count is None) == (threshold is None):
        raise ValueError("give exactly one of count, threshold")
    ranked = sorted(_finite_pairs(scores), key=lambda p: (-p[1], p[0]))
    if count is not None:
        if count < 0:
            raise ValueError("count must be non-negative")
        return [name for name, _ in ranked[: int(count)]]
    return [name for name, value in ranked if value >= threshold]


# ---------------------------------------------------------------------------------------
# DDI ablation


def parse_components(text: str) -> tuple[str, ...]:
    """``"S,O"`` → ``("S", "O")``: a non-empty subset of S, O, M in canonical order.

    Case-insensitive; ``+`` and spaces separate too. Raises ValueError on an unknown,
    repeated or missing letter.
    """
    parts = [p for p in text.replace("+", ",").replace(" ", ",").upper().split(",") if p]
    if not parts:
        raise ValueError("give at least one of S, O, M")
    unknown = [p for p in parts if p not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown component {unknown[0]!r}: choose from S, O, M")
    if len(set(parts)) != len(parts):
        raise ValueError("a component is repeated")
    return tuple(c for c in COMPONENTS if c in parts)


def components(subset: Iterable[str], *, sharpness: float, deviation: float, magnitude: float) -> float:
    """DDI's ablation score: the product of the chosen components (the DDI paper's ablation [4]_).

    Parameters
    ----------
    subset : iterable of "S", "O", "M"
        Non-empty; ``{"S", "O", "M"}`` gives DDI itself.
    sharpness, deviation : float
        S and O (:mod:`ddiscan.spectral`).
    magnitude : float
        M_norm (DDI's default) or raw M, whichever the scan uses for "M".
    """
    chosen = set(subset)
    if not chosen:
        raise ValueError("give at least one of S, O, M")
    if not chosen <= set(COMPONENTS):
        raise ValueError(f"unknown component {sorted(chosen - set(COMPONENTS))[0]!r}: choose from S, O, M")
    values = {"S": sharpness, "O": deviation, "M": magnitude}
    product = 1.0
    for c in COMPONENTS:
        if c in chosen:
            product *= values[c]
    return product
