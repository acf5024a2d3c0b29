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

The :class:`~ddiscan.ritz.Ritz` they return and its error bar are in :mod:`ddiscan.ritz`.
"""

from __future__ import annotations

import math

import numpy as np

from .blas import one_thread
from .ritz import Ritz, error_bar, other_side, prefix_norms
from .spectral import _cholesky_upper, orthonormalize

__all__ = ["Ritz", "subspace_iteration", "block_krylov", "rayleigh_ritz", "error_bar", "other_side"]


def _transposed(w0, xp):
    """W0ᵀ: ``w0.mT`` (arrays of the array API, and :mod:`ddiscan.panels` operators)."""
    return w0.mT if hasattr(w0, "mT") else xp.linalg.matrix_transpose(w0)


def _peak(w0, xp) -> float:
    """max |W0|: an operator's own ``peak()``, else from the array."""
    return float(w0.peak()) if hasattr(w0, "peak") else float(xp.max(xp.abs(w0)))


def _sample(w0, omega, *, xp):
    """``(w0, W0 Ω)``; W0 divided by max|W0| when the product overflows (finite values near
    the dtype's limit): the subspaces and the error bar are those of W0 / max|W0|."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is handled below, not printed
        sample = w0 @ omega
    if not bool(xp.all(xp.isfinite(sample))):
        w0 = w0 / _peak(w0, xp)
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
    w0_t = _transposed(w0, xp)
    for _ in range(power_iters):
        sample = w0 @ (w0_t @ orthonormalize(sample, xp=xp, passes=1))
    basis = orthonormalize(sample, xp=xp)
    return rayleigh_ritz(w0, basis, w0_t @ basis, t=t, xp=xp, right=right)


def block_krylov(w0, omega, *, t: int, iters: int, xp, right: bool = False) -> Ritz:
    """Ritz vectors from the block Krylov space of W0 W0ᵀ started at W0 Ω [2]_ [3]_ (SPEC.md §2).

    On the smaller side of W0: for d ≤ k, Q spans K = [Y, (W0W0ᵀ) Y, …, (W0W0ᵀ)^iters Y],
    Y = W0 Ω, built one block at a time (for d > k the same on W0ᵀ, in R^k, whose Ritz
    vectors are W0's right ones; W0's left ones are then the normalised columns of W0 V_t,
    which the residual needs anyway, and ``side`` is "right"):
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
    omega : array, shape (max(d, k), b)
        Test matrix (the block size b ≥ t), in w0's namespace and dtype.
    t : int
    iters : int
        Krylov iterations: the basis has up to (iters + 1) · b columns.
    xp : array namespace
    right : bool, default False

    Notes
    -----
    The same 3 + 2 · ``iters`` products with W0 or W0ᵀ as :func:`subspace_iteration` with
    ``power_iters = iters``, each O(d k b); on top, orthogonalisation O(n (iters · b)² ·
    iters) with n = min(d, k), the m × m matrix of Rayleigh–Ritz O(max(d, k) m²) and its
    eigenproblem O(m³), m = (iters + 1) b. On slowly decaying spectra it
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
    if w0.shape[0] <= w0.shape[1]:
        return _left_krylov(w0, omega, t=t, iters=iters, xp=xp, right=right)
    ritz = _left_krylov(_transposed(w0, xp), omega, t=t, iters=iters, xp=xp, right=True)
    return Ritz(left=ritz.right, right=ritz.left if right else None, values=ritz.values, residual=ritz.residual,
                complete=ritz.complete, prefix=ritz.prefix, side="right")


def _left_krylov(w0, omega, *, t: int, iters: int, xp, right: bool) -> Ritz:
    """:func:`block_krylov` on the left side of ``w0``, whatever its shape."""
    w0, sample = _sample(w0, omega, xp=xp)
    w0_t = _transposed(w0, xp)
    (d, k), limit = w0.shape, min(w0.shape)
    first = orthonormalize(sample, xp=xp)
    b = first.shape[1]
    size = min(limit, b * (iters + 1))
    basis, rows = xp.empty((d, size), dtype=first.dtype), xp.empty((k, size), dtype=first.dtype)
    gram = xp.zeros((size, size), dtype=xp.float64)  # QᵀW0W0ᵀQ, from the Gram–Schmidt coefficients
    basis[:, :b], rows[:, :b] = first, w0_t @ first
    start, width = 0, b
    for _ in range(iters):
        if width + b > size:  # the last block would be cut to fit: no recurrence for its coefficients
            gram = None
        if width >= size:
            break
        grown = w0 @ rows[:, start:width]  # W0W0ᵀ Q_i
        step = _next_block(basis[:, :width], grown[:, :min(size - width, grown.shape[1])], xp=xp)
        if step is None:
            break
        block, projection, link = step
        if gram is not None:  # W0W0ᵀ Q_i = Q · projection + Q_{i+1} · link
            gram[:width, start:width], gram[width:width + b, start:width] = projection, link
        start, width = width, width + block.shape[1]
        basis[:, start:width], rows[:, start:width] = block, w0_t @ block
    if gram is not None:
        gram = _completed(gram[:width, :width], rows[:, :width], start, xp=xp)
    return rayleigh_ritz(w0, basis[:, :width], rows[:, :width], t=t, xp=xp, right=right, gram=gram)


def _completed(gram, rows, start: int, *, xp):
    """The Rayleigh–Ritz matrix QᵀW0W0ᵀQ from the recurrence's columns and the last block's
    column (W0ᵀQ)ᵀ(W0ᵀQ_last), made symmetric."""
    gram[:, start:] = xp.astype(xp.linalg.matrix_transpose(rows) @ rows[:, start:], xp.float64)
    return (gram + xp.linalg.matrix_transpose(gram)) * 0.5


def _next_block(basis, block, *, xp, shifted: bool = False):
    """``block`` X orthogonalised against the orthonormal ``basis`` Q and orthonormalised:
    block Gram–Schmidt twice, each pass followed by Cholesky QR. Returns (Q', P, F) with
    X = Q P + Q' F (P: coefficients in the basis, F upper triangular), or None when the block
    has no new direction (a Gram matrix not positive definite). ``shifted`` makes the first
    Cholesky QR a shifted one [6]_, which cannot fail on an ill-conditioned block:
    benchmarks/KRYLOV.md measured it less accurate in float32, so the kernel does not use it."""
    basis_t = _transposed(basis, xp)
    projection = factor = None
    for shifted in (shifted, False):
        coefficients = basis_t @ block
        block = block - basis @ coefficients
        gram = xp.astype(xp.linalg.matrix_transpose(block) @ block, xp.float64)
        if shifted:
            gram = gram + _shift(gram, rows=block.shape[0], dtype=block.dtype, xp=xp)
        upper = _cholesky_upper(gram, xp=xp)
        if upper is None:
            return None
        with one_thread():
            inverse = xp.linalg.inv(upper)
        block = block @ xp.astype(inverse, block.dtype)
        coefficients = xp.astype(coefficients, xp.float64)
        if factor is None:
            projection, factor = coefficients, upper
        else:  # X = Q P + Y F and Y = Q C + Q' R: X = Q (P + C F) + Q' (R F)
            projection, factor = projection + coefficients @ factor, upper @ factor
    return block, projection, factor


def _shift(gram, *, rows: int, dtype, xp):
    """s · I with s = 11 (n l + l (l + 1)) u ‖B‖₂² (Fukaya et al. [6]_), ‖B‖₂² ≤ trace of the Gram."""
    width = gram.shape[0]
    unit = float(xp.finfo(dtype).eps) / 2
    scale = 11.0 * (rows * width + width * (width + 1)) * unit * float(xp.sum(xp.linalg.diagonal(gram)))
    return scale * xp.eye(width, dtype=xp.float64)


def rayleigh_ritz(w0, basis, rows, *, t: int, xp, right: bool = False, gram=None) -> Ritz:
    """The top-t Ritz vectors of W0 in span(``basis``), and their residual.

    ``rows`` = W0ᵀ Q (k × m). The Ritz values are the square roots of the eigenvalues of
    the m × m matrix (Qᵀ W0)(W0ᵀ Q) (formed in the basis' dtype, in float64 where that
    overflows; solved in float64), Q_t = Q Ũ_t; the residual R = W0 (W0ᵀ Q_t) − Q_t Θ_t²
    costs one product with W0 of width t, O(d k t), and its norm ‖R‖₂ a t × t eigenproblem.
    With ``right``, also span(W0ᵀ Q_t) (k × t), the top-t right singular directions: the
    columns of W0ᵀ Q_t Θ_t⁻¹, nearly orthonormal already, orthonormalised.
    """
    values, rotation = _ritz_pairs(rows, t=t, xp=xp, gram=gram)
    ritz = np.sqrt(np.clip(np.asarray(_to_numpy(values)), 0.0, None))
    left = basis @ xp.astype(rotation, basis.dtype)
    image = rows @ xp.astype(rotation, rows.dtype)  # W0ᵀ Q_t
    with np.errstate(over="ignore", invalid="ignore"):
        residual = w0 @ image - left * xp.astype(xp.asarray(ritz[:t] ** 2), left.dtype)
        wide_residual = xp.astype(residual, xp.float64)
        residual_gram = xp.linalg.matrix_transpose(wide_residual) @ wide_residual
        norm = _spectral_norm(residual_gram, xp=xp)
    other = _normalized(image, ritz[:t], xp=xp) if right else None
    return Ritz(left=left, right=other, values=ritz, residual=norm, complete=basis.shape[1] >= min(w0.shape),
                prefix=prefix_norms(_to_numpy(residual_gram), norm))


def _ritz_pairs(rows, *, t: int, xp, gram=None):
    """Every eigenvalue of ``gram`` (default rowsᵀ rows), descending (float64), and the
    top-t eigenvectors."""
    if gram is None or not bool(xp.all(xp.isfinite(gram))):
        gram = xp.linalg.matrix_transpose(rows) @ rows
    if not bool(xp.all(xp.isfinite(gram))):  # the squares overflow the dtype: form it in float64
        wide = xp.astype(rows, xp.float64)
        gram = xp.linalg.matrix_transpose(wide) @ wide
    with one_thread():
        values, vectors = xp.linalg.eigh(xp.astype(gram, xp.float64))
    order = xp.argsort(-values)
    return xp.take(values, order), xp.take(vectors, order[:t], axis=1)


def _normalized(image, theta, *, xp):
    """An orthonormal basis of span(``image``), whose columns have norms ``theta``: scaled to
    unit columns first, so Cholesky QR meets a well-conditioned block."""
    scale = np.where(theta > 0, 1.0 / np.where(theta > 0, theta, 1.0), 1.0)
    return orthonormalize(image * xp.astype(xp.asarray(scale), image.dtype), xp=xp)


def _spectral_norm(gram, *, xp) -> float:
    """‖R‖₂ from the Gram matrix RᵀR (inf when it is not finite)."""
    if not bool(xp.all(xp.isfinite(gram))):
        return math.inf
    with one_thread():
        return math.sqrt(max(0.0, float(xp.max(xp.linalg.eigvalsh(gram)))))


def _to_numpy(array):
    """A host copy (CuPy arrays are not converted implicitly)."""
    return array.get() if hasattr(array, "get") else array
