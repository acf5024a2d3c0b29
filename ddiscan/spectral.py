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
    "exact_basis",
    "frobenius_norm",
]

EPS = 1e-6


@dataclass(frozen=True)
class Spectrum:
    """What scoring needs from the factors of one update.

    Attributes
    ----------
    sigma : array, shape (r,)
        Singular values of ΔW, descending.
    r_down : array, shape (r, r)
        R factor of the thin QR of Vᵀ; ‖X · V‖_F = ‖X · R_downᵀ‖_F for any X.
    energy : float
        ‖ΔW‖_F² = Σ σᵢ².
    top : float
        σ₁² (0 when r = 0).
    """

    sigma: object
    r_down: object
    energy: float
    top: float


def update_spectrum(up, down, scale: float, *, xp) -> Spectrum:
    """Singular values of ΔW = s · up · down without forming ΔW (SPEC.md §2, erratum E1).

    Thin QR: up = Q_U R_U, downᵀ = Q_V R_V; then σ(ΔW) = |s| · σ(R_U R_Vᵀ), an r × r SVD.

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
    _, r_up = xp.linalg.qr(up)
    _, r_down = xp.linalg.qr(xp.linalg.matrix_transpose(down))
    core = r_up @ xp.linalg.matrix_transpose(r_down)
    sigma = xp.linalg.svdvals(core) * abs(scale)
    energy = float(xp.sum(sigma * sigma))
    top = float(sigma[0]) ** 2 if sigma.shape[0] else 0.0
    return Spectrum(sigma=sigma, r_down=r_down, energy=energy, top=top)


def sharpness(spectrum: Spectrum) -> float:
    """S = σ₁² / (Σ σᵢ² + ε), in [0, 1]; 0 for ΔW = 0 (SPEC.md §2, Eq. 2)."""
    return spectrum.top / (spectrum.energy + EPS)


def deviation(basis, up, spectrum: Spectrum, scale: float, *, xp) -> float:
    """O = 1 − ‖Q_tᵀ ΔW‖_F² / (‖ΔW‖_F² + ε), clamped to [0, 1] (SPEC.md §2, Eq. 3).

    ‖Q_tᵀ ΔW‖_F = |s| · ‖(Q_tᵀ U) V‖_F = |s| · ‖(Q_tᵀ U) R_Vᵀ‖_F, so the cost is
    O(d t r + t r²) and ΔW is never formed.

    Parameters
    ----------
    basis : array, shape (d, t)
        Orthonormal columns spanning W0's dominant column space.
    up : array, shape (d, r)
    spectrum : Spectrum
        From :func:`update_spectrum` of the same update.
    scale : float
    """
    projected = xp.linalg.matrix_transpose(xp.astype(basis, up.dtype)) @ up
    captured = projected @ xp.linalg.matrix_transpose(spectrum.r_down)
    inside = scale**2 * float(xp.sum(captured * captured))
    value = 1.0 - inside / (spectrum.energy + EPS)
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


def randomized_basis(w0, omega, *, t: int, power_iters: int, xp):
    """Q_t from a randomized range finder with power iterations (SPEC.md §2 steps 1–3).

    1. Y = W0 Ω;
    2. ``power_iters`` times: Y ← W0 (W0ᵀ Y), re-orthonormalising after each product;
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

    Returns
    -------
    array, shape (d, t)
        Orthonormal columns.

    Notes
    -----
    Reads W0 2 + 2 · ``power_iters`` times; each pass costs O(d k (t + q)).
    """
    w0_t = xp.linalg.matrix_transpose(w0)
    sample, _ = xp.linalg.qr(w0 @ omega)
    for _ in range(power_iters):
        back, _ = xp.linalg.qr(w0_t @ sample)
        sample, _ = xp.linalg.qr(w0 @ back)
    small = xp.linalg.matrix_transpose(sample) @ w0
    left, _, _ = xp.linalg.svd(small, full_matrices=False)
    return sample @ left[:, :t]


def exact_basis(w0, *, t: int, xp):
    """Q_t = the top-t left singular vectors of W0 from a full SVD (verification mode)."""
    left, _, _ = xp.linalg.svd(w0, full_matrices=False)
    return left[:, :t]


def frobenius_norm(w0, *, xp, block_rows: int = 1024) -> float:
    """‖W0‖_F accumulated in float64 over row blocks, whatever W0's dtype."""
    total = 0.0
    for start in range(0, w0.shape[0], block_rows):
        block = xp.astype(w0[start:min(start + block_rows, w0.shape[0]), ...], xp.float64)
        total += float(xp.sum(block * block))
    return math.sqrt(total)
