"""W0's dominant subspace by Rayleigh–Ritz on a sketched basis, with an error bar (SPEC.md §2).

Two range finders build an orthonormal basis Q (d × m) of an approximation of W0's
dominant column space: subspace (power) iteration, whose basis is its last block, and
block Krylov iteration, whose basis is every block it went through. Both then take the
top-t Ritz vectors of W0 in span(Q), and one more product with W0 gives the residual
that bounds how far they are from W0's exact top-t singular vectors. Pure array
functions of namespace ``xp``, as in :mod:`ddiscan.spectral`.

References
----------
.. [1] N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness", SIAM
   Review 53(2), 2011 (Algorithms 4.1 and 4.4).
.. [2] C. Musco, C. Musco, "Randomized block Krylov methods for stronger and faster
   approximate singular value decomposition", NeurIPS 2015 (Algorithm 2).
.. [3] J. A. Tropp, R. J. Webber, "Randomized algorithms for low-rank matrix
   approximation: design, analysis, and applications", arXiv:2306.12418, 2023 (§11, block Krylov).
.. [4] G. W. Stewart, J.-G. Sun, "Matrix Perturbation Theory", 1990 (Davis–Kahan sin Θ theorem).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .blas import one_thread
from .spectral import _cholesky_upper, orthonormalize

__all__ = ["Ritz", "subspace_iteration", "block_krylov", "rayleigh_ritz", "error_bar", "other_side"]


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


def _sample(w0, omega, *, xp):
    """``(w0, W0 Ω)``; W0 divided by max|W0| when the product overflows (finite values near
    the dtype's limit): the subspaces and the error bar are those of W0 / max|W0|."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is handled below, not printed
        sample = w0 @ omega
    if not bool(xp.all(xp.isfinite(sample))):
        w0 = w0 / xp.max(xp.abs(w0))
        sample = w0 @ omega
    return w0, sample


def subspace_iteration(w0, omega, *, t: int, power_iters: int, xp, right: bool = False) -> Ritz:
    """Ritz vectors from the randomized range finder with power iterations [1]_ (SPEC.md §2).

    Y = W0 Ω; ``power_iters`` times Y ← W0 (W0ᵀ Y), Y re-orthonormalised (one Cholesky QR
    pass) before each; Q = qr(Y); then :func:`rayleigh_ritz` on Q.

    Parameters
    ----------
    w0 : array, shape (d, k)
    omega : array, shape (k, b)
        Test matrix, b ≥ t columns, in w0's namespace and dtype.
    t : int
    power_iters : int
    xp : array namespace
    right : bool, default False

    Notes
    -----
    3 + 2 · ``power_iters`` products with W0 or W0ᵀ, each O(d k b) (the last, of width t,
    gives the residual).
    """
    w0, sample = _sample(w0, omega, xp=xp)
    w0_t = xp.linalg.matrix_transpose(w0)
    for _ in range(power_iters):
        sample = w0 @ (w0_t @ orthonormalize(sample, xp=xp, passes=1))
    basis = orthonormalize(sample, xp=xp)
    return rayleigh_ritz(w0, basis, w0_t @ basis, t=t, xp=xp, right=right)


def block_krylov(w0, omega, *, t: int, iters: int, xp, right: bool = False) -> Ritz:
    """Ritz vectors from the block Krylov space of W0 W0ᵀ started at W0 Ω [2]_ [3]_ (SPEC.md §2).

    Q spans K = [Y, (W0W0ᵀ) Y, …, (W0W0ᵀ)^iters Y], Y = W0 Ω, built one block at a time:
    each new block W0 (W0ᵀ Q_i) is orthogonalised against all earlier blocks by block
    Gram–Schmidt twice (BCGS2 [5]_), each pass followed by Cholesky QR, which keeps Q
    orthonormal in float32 (benchmarks/KRYLOV.md measures it against a shifted Cholesky QR
    [6]_ in the first pass, and keeps the more accurate). W0ᵀ Q_i, which the next block
    needs anyway, is the i-th block of (Qᵀ W0)ᵀ, so Rayleigh–Ritz on all of K costs no
    further pass over W0. The space stops growing when it has min(d, k) columns (the last
    block cut to fit) or no new direction.

    Parameters
    ----------
    w0 : array, shape (d, k)
    omega : array, shape (k, b)
        Test matrix (the block size b ≥ t), in w0's namespace and dtype.
    t : int
    iters : int
        Krylov iterations: the basis has up to (iters + 1) · b columns.
    xp : array namespace
    right : bool, default False

    Notes
    -----
    The same 3 + 2 · ``iters`` products with W0 or W0ᵀ as :func:`subspace_iteration` with
    ``power_iters = iters``, each O(d k b); on top, orthogonalisation O(d (iters · b)² ·
    iters) and an m × m eigenproblem, m = (iters + 1) b. On slowly decaying spectra it
    reaches a given accuracy in O(1/√ε) iterations where subspace iteration needs
    O(1/ε) [2]_.

    References
    ----------
    .. [5] J. L. Barlow, A. Smoktunowicz, "Reorthogonalized block classical Gram–Schmidt",
       Numerische Mathematik 123, 2013.
    .. [6] T. Fukaya, R. Kannan, Y. Nakatsukasa, Y. Yamamoto, Y. Yanagisawa, "Shifted Cholesky
       QR for computing the QR factorization of ill-conditioned matrices", SIAM J. Sci.
       Comput. 42(1), 2020.
    """
    w0, sample = _sample(w0, omega, xp=xp)
    w0_t = xp.linalg.matrix_transpose(w0)
    blocks = [orthonormalize(sample, xp=xp)]
    rows = [w0_t @ blocks[0]]
    width, limit = blocks[0].shape[1], min(w0.shape)
    for _ in range(iters):
        if width >= limit:
            break
        grown = w0 @ rows[-1]
        block = _next_block(xp.concat(blocks, axis=1), grown[:, :min(limit - width, grown.shape[1])], xp=xp)
        if block is None:
            break
        blocks.append(block)
        rows.append(w0_t @ block)
        width += block.shape[1]
    return rayleigh_ritz(w0, xp.concat(blocks, axis=1), xp.concat(rows, axis=1), t=t, xp=xp, right=right)


def _next_block(basis, block, *, xp, shifted: bool = False):
    """``block`` orthogonalised against the orthonormal ``basis`` and orthonormalised: block
    Gram–Schmidt twice, each pass followed by Cholesky QR; None when the block has no new
    direction (a Gram matrix not positive definite). ``shifted`` makes the first Cholesky QR
    a shifted one [6]_, which cannot fail on an ill-conditioned block: benchmarks/KRYLOV.md
    measured it less accurate in float32, so the kernel does not use it."""
    basis_t = xp.linalg.matrix_transpose(basis)
    for shifted in (shifted, False):
        block = block - basis @ (basis_t @ block)
        gram = xp.astype(xp.linalg.matrix_transpose(block) @ block, xp.float64)
        if shifted:
            gram = gram + _shift(gram, rows=block.shape[0], dtype=block.dtype, xp=xp)
        upper = _cholesky_upper(gram, xp=xp)
        if upper is None:
            return None
        with one_thread():
            inverse = xp.linalg.inv(upper)
        block = block @ xp.astype(inverse, block.dtype)
    return block


def _shift(gram, *, rows: int, dtype, xp):
    """s · I with s = 11 (n l + l (l + 1)) u ‖B‖₂² (Fukaya et al. [6]_), ‖B‖₂² ≤ trace of the Gram."""
    width = gram.shape[0]
    unit = float(xp.finfo(dtype).eps) / 2
    scale = 11.0 * (rows * width + width * (width + 1)) * unit * float(xp.sum(xp.linalg.diagonal(gram)))
    return scale * xp.eye(width, dtype=xp.float64)


def rayleigh_ritz(w0, basis, rows, *, t: int, xp, right: bool = False) -> Ritz:
    """The top-t Ritz vectors of W0 in span(``basis``), and their residual.

    ``rows`` = W0ᵀ Q (k × m). The Ritz values are the square roots of the eigenvalues of
    the m × m matrix (Qᵀ W0)(W0ᵀ Q) (in float64), Q_t = Q Ũ_t; the residual
    R = W0 (W0ᵀ Q_t) − Q_t Θ_t² costs one product with W0 of width t, O(d k t), and its
    norm ‖R‖₂ a t × t eigenproblem.
    With ``right``, also span(W0ᵀ Q_t) (k × t), the top-t right singular directions.
    """
    wide = xp.astype(rows, xp.float64)
    gram = xp.linalg.matrix_transpose(wide) @ wide
    with one_thread():
        values, vectors = xp.linalg.eigh(gram)
    order = xp.argsort(-values)
    rotation = xp.take(vectors, order[:t], axis=1)
    ritz = np.sqrt(np.clip(np.asarray(_to_numpy(xp.take(values, order))), 0.0, None))
    left = basis @ xp.astype(rotation, basis.dtype)
    image = rows @ xp.astype(rotation, rows.dtype)  # W0ᵀ Q_t
    with np.errstate(over="ignore", invalid="ignore"):
        residual = w0 @ image - left * xp.astype(xp.asarray(ritz[:t] ** 2), left.dtype)
        wide_residual = xp.astype(residual, xp.float64)
        residual_gram = xp.linalg.matrix_transpose(wide_residual) @ wide_residual
        norm = _spectral_norm(residual_gram, xp=xp)
    other = xp.astype(orthonormalize(wide @ rotation, xp=xp), w0.dtype) if right else None
    return Ritz(left=left, right=other, values=ritz, residual=norm, complete=basis.shape[1] >= min(w0.shape),
                prefix=prefix_norms(_to_numpy(residual_gram), norm))


def _spectral_norm(gram, *, xp) -> float:
    """‖R‖₂ from the Gram matrix RᵀR (inf when it is not finite)."""
    if not bool(xp.all(xp.isfinite(gram))):
        return math.inf
    with one_thread():
        return math.sqrt(max(0.0, float(xp.max(xp.linalg.eigvalsh(gram)))))


def _to_numpy(array):
    """A host copy (CuPy arrays are not converted implicitly)."""
    return array.get() if hasattr(array, "get") else array
