"""The Directional Deviation Index, as pure array functions (SPEC.md §2–3).

No I/O and no global state. Every function takes its arrays and, where it creates arrays,
the array namespace ``xp`` (``numpy``, ``cupy`` through ``array_api_compat``, or any
namespace of the Python array API standard), so one code path runs on the CPU and the GPU.

Letters follow SPEC.md: ΔW = s · U · V with U = ``lora_B`` (d × r) and V = ``lora_A``
(r × k); W0 is d × k; Q_t (d × t) spans W0's dominant column space.

References
----------
.. [1] N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness:
   probabilistic algorithms for constructing approximate matrix decompositions",
   SIAM Review 53(2), 2011. Algorithms 4.1 (range finder) and 4.4 (power iterations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .blas import one_thread

__all__ = [
    "EPS",
    "Spectrum",
    "update_spectrum",
    "sharpness",
    "deviation",
    "magnitude",
    "magnitude_norm",
    "gaussian_test_matrix",
    "randomized_basis",
    "orthonormalize",
    "exact_basis",
]

EPS = 1e-6


@dataclass(frozen=True)
class Spectrum:
    """What scoring needs from the factors of one update.

    The factors are scaled by powers of two (exactly) before any product, so that no
    square overflows: ΔW = factor · Û · V̂ with Û = up / up_factor, V̂ = down / down_factor.

    Attributes
    ----------
    unit : array, shape (r,)
        Singular values of Û · V̂, descending (σ(ΔW) = factor · unit).
    r_down : array, shape (r, r)
        R factor of the thin QR of V̂ᵀ; ‖X · V̂‖_F = ‖X · R_downᵀ‖_F for any X.
    factor : float
        |s| · up_factor · down_factor.
    up_factor : float
        The power of two ``up`` is divided by.
    unit_energy, unit_top : float
        Σ unitᵢ² and unit₁² (0 when r = 0).
    """

    unit: object
    r_down: object
    factor: float
    up_factor: float
    unit_energy: float
    unit_top: float

    @property
    def sigma(self):
        """Singular values of ΔW (inf where beyond the float64 range)."""
        return self.unit * self.factor

    @property
    def norm(self) -> float:
        """‖ΔW‖_F, computed without squaring ΔW's values (inf only if ‖ΔW‖_F itself is)."""
        return math.sqrt(self.unit_energy) * self.factor

    @property
    def energy(self) -> float:
        """‖ΔW‖_F² (inf beyond the float64 range)."""
        return self.norm * self.norm

    def ratio(self, part: float) -> float:
        """(factor² · part) / (‖ΔW‖_F² + EPS), without forming factor²; 0 for ΔW = 0."""
        if self.factor == 0:
            return 0.0
        return part / (self.unit_energy + EPS / self.factor / self.factor)


def _power_of_two(block, *, xp) -> float:
    """A power of two near max |block| (1 for a zero or non-finite block): dividing by it is exact."""
    peak = float(xp.max(xp.abs(block))) if block.shape[0] and block.shape[-1] else 0.0
    if peak == 0 or not np.isfinite(peak):
        return 1.0
    return math.ldexp(1.0, min(1000, max(-1000, math.frexp(peak)[1])))


def update_spectrum(up, down, scale: float, *, xp) -> Spectrum:
    """Singular values of ΔW = s · up · down without forming ΔW (SPEC.md §2, erratum E1).

    Thin QR: up = Q_U R_U, downᵀ = Q_V R_V; then σ(ΔW) = |s| · σ(R_U R_Vᵀ), an r × r SVD.
    The R factors come from the Cholesky factors of the float64 Gram matrices UᵀU and
    VVᵀ (the R of a thin QR, up to signs, at a fraction of Householder QR's cost on
    tall-skinny factors), and from Householder QR when a Gram matrix is singular
    (rank-deficient factors). Each factor is first divided by a power of two near its
    largest value, so finite factors of any size give finite Gram matrices.

    Parameters
    ----------
    up : array, shape (d, r)
    down : array, shape (r, k)
    scale : float
    xp : array namespace

    Notes
    -----
    Cost O((d + k) r²).
    """
    up_factor, down_factor = _power_of_two(up, xp=xp), _power_of_two(down, xp=xp)
    r_up = _r_factor(up * (1.0 / up_factor), xp=xp)
    r_down = _r_factor(xp.linalg.matrix_transpose(down * (1.0 / down_factor)), xp=xp)
    core = r_up @ xp.linalg.matrix_transpose(r_down)
    unit = xp.linalg.svdvals(core)
    return Spectrum(unit=unit, r_down=r_down, factor=abs(scale) * up_factor * down_factor, up_factor=up_factor,
                    unit_energy=float(xp.sum(unit * unit)), unit_top=float(unit[0]) ** 2 if unit.shape[0] else 0.0)


def _r_factor(block, *, xp):
    """R of a thin QR of a tall float64 ``block``: Cholesky of its Gram matrix, or QR."""
    upper = _cholesky_upper(xp.linalg.matrix_transpose(block) @ block, xp=xp)
    return xp.linalg.qr(block)[1] if upper is None else upper


def _cholesky_upper(gram, *, xp):
    """Upper Cholesky factor R (gram = RᵀR), or None when gram is not positive definite."""
    try:
        with one_thread():
            upper = xp.linalg.matrix_transpose(xp.linalg.cholesky(gram))
    except Exception:  # numpy raises LinAlgError; other namespaces may return NaN
        return None
    if not bool(xp.all(xp.isfinite(upper))) or not bool(xp.all(xp.linalg.diagonal(upper) > 0)):
        return None
    return upper


def sharpness(spectrum: Spectrum) -> float:
    """S = σ₁² / (Σ σᵢ² + ε), in [0, 1]; 0 for ΔW = 0 (SPEC.md §2, Eq. 2)."""
    return spectrum.ratio(spectrum.unit_top)


def deviation(basis, up, spectrum: Spectrum, scale: float, *, xp) -> float:
    """O = 1 − ‖Q_tᵀ ΔW‖_F² / (‖ΔW‖_F² + ε), clamped to [0, 1] (SPEC.md §2, Eq. 3).

    ‖Q_tᵀ ΔW‖_F = |s| · ‖(Q_tᵀ U) V‖_F = |s| · ‖(Q_tᵀ U) R_Vᵀ‖_F, so the cost is
    O(d t r + t r²) and ΔW is never formed; U and V as scaled in ``spectrum``, so no
    square overflows (``scale`` is in ``spectrum.factor``).

    Parameters
    ----------
    basis : array, shape (d, t)
        Orthonormal columns spanning W0's dominant column space.
    up : array, shape (d, r)
    spectrum : Spectrum
        From :func:`update_spectrum` of the same update.
    scale : float
    """
    projected = xp.linalg.matrix_transpose(xp.astype(basis, up.dtype)) @ (up * (1.0 / spectrum.up_factor))
    captured = projected @ xp.linalg.matrix_transpose(spectrum.r_down)
    value = 1.0 - spectrum.ratio(float(xp.sum(captured * captured)))
    return min(1.0, max(0.0, value))


def magnitude(delta_norm: float, base_norm: float) -> float:
    """M = ‖ΔW‖_F / (‖W0‖_F + ε) (SPEC.md §2, Eq. 4)."""
    return delta_norm / (base_norm + EPS)


def magnitude_norm(delta_norm: float, base_norm: float) -> float:
    """M_norm = ‖ΔW‖_F / (‖W0‖_F + ‖ΔW‖_F + ε), in [0, 1) (SPEC.md §2, Eq. 5)."""
    return delta_norm / (base_norm + delta_norm + EPS)


def gaussian_test_matrix(k: int, width: int, seed: int) -> np.ndarray:
    """Ω ∈ R^{k × width}, standard Gaussian, float32, a function of (seed, k, width) only.

    Seeding by shape makes Ω independent of the order modules are scanned in, so the
    same inputs give the same report; it is what may be cached per shape (erratum E4).
    """
    rng = np.random.default_rng([seed, k, width])
    return rng.standard_normal((k, width), dtype=np.float32)


def thin_factors(up: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(up, down)`` with the same product ΔW = up · down and at most min(d, k) columns.

    A rank above the smaller side of ΔW adds nothing to it, but the kernels' Gram matrices
    are r × r: a small file with r far above d and k would ask for r² memory. One reduced
    QR of the wide factor, whose memory is that factor's own, folds it away: down = Q R
    gives ΔW = (up Q) R; upᵀ = Q R gives ΔW = Rᵀ (Qᵀ down).
    """
    if up.shape[1] > down.shape[1]:
        q, upper = np.linalg.qr(down)
        up, down = up @ q, upper
    if up.shape[1] > up.shape[0]:
        q, upper = np.linalg.qr(up.T)
        up, down = upper.T, q.T @ down
    return up, down


def randomized_basis(w0, omega, *, t: int, power_iters: int, xp, right: bool = False):
    """Q_t from a randomized range finder with power iterations (SPEC.md §2 steps 1–3).

    1. Y = W0 Ω;
    2. ``power_iters`` times: Y ← W0 (W0ᵀ Y), re-orthonormalising Y before each
       iteration (once per iteration: W0ᵀ Y needs no normalising of its own when Y is
       orthonormal, and a block that has lost rank falls back to Householder QR);
    3. Q₀ = qr(Y); Bₛ = Q₀ᵀ W0 = Ũ Σ Wᵀ; Q_t = Q₀ Ũ[:, :t] (erratum E3).

    Parameters
    ----------
    w0 : array, shape (d, k)
        The base weight, float32 (or wider).
    omega : array, shape (k, t + q)
        Test matrix from :func:`gaussian_test_matrix`, in w0's namespace and dtype.
    t : int
        Subspace dimension, at most ``omega.shape[1]``.
    power_iters : int
    xp : array namespace
    right : bool, default False
        Also return the matching right basis, span(W[:, :t]), for base profiles.

    Returns
    -------
    array, shape (d, t)
        Orthonormal columns; with ``right``, a pair (left (d, t), right (k, t)).

    Notes
    -----
    Reads W0 2 + 2 · ``power_iters`` times; each pass costs O(d k (t + q)) and is all
    the work that scales with W0. Orthonormalisation is Cholesky QR [2]_ (O(d (t+q)²),
    several times cheaper than Householder QR on tall-skinny blocks), and Ũ comes from
    the (t+q)² eigenproblem of Bₛ Bₛᵀ instead of an SVD of the (t+q) × k matrix Bₛ.

    References
    ----------
    .. [2] T. Fukaya, Y. Nakatsukasa, Y. Yanagisawa, Y. Yamamoto, "CholeskyQR2: a simple
       and communication-avoiding algorithm for computing a tall-skinny QR
       factorization", ScalA 2014.
    """
    from .krylov import subspace_iteration  # it builds on this module's orthonormalize

    ritz = subspace_iteration(w0, omega, t=t, power_iters=power_iters, xp=xp, right=right)
    return (ritz.left, ritz.right) if right else ritz.left


def exact_basis(w0, *, t: int, xp, right: bool = False):
    """Q_t = the top-t left singular vectors of W0 from a full SVD (verification mode);
    with ``right``, also the top-t right singular vectors (k, t)."""
    left, _, right_t = xp.linalg.svd(w0, full_matrices=False)
    if not right:
        return left[:, :t]
    return left[:, :t], xp.linalg.matrix_transpose(right_t[:t, :])


def orthonormalize(block, *, xp, passes: int = 2):
    """An orthonormal basis of the columns of a tall ``block`` (n × l), same dtype.

    Cholesky QR: R from the Cholesky factor (in float64) of the Gram matrix BᵀB (formed in
    the block's dtype, one small GEMM), Q = B R⁻¹ in the block's dtype. One pass normalises a block between power iterations,
    where only its span matters; two (CholeskyQR2) make Q orthonormal to working
    precision [2]_. A block whose Gram matrix is singular falls back to Householder QR.
    """
    q = block
    for _ in range(passes):
        gram = xp.astype(xp.linalg.matrix_transpose(q) @ q, xp.float64)
        upper = _cholesky_upper(gram, xp=xp)
        if upper is None:
            return xp.linalg.qr(block)[0]
        with one_thread():
            inverse = xp.linalg.inv(upper)
        q = q @ xp.astype(inverse, q.dtype)
    return q
