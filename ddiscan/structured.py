"""LoHa's and LoKr's updates as structured products, as pure array functions (SPEC.md §11).

No I/O and no global state; every function takes its arrays and, where it creates arrays,
the array namespace ``xp`` (as :mod:`ddiscan.spectral`).

* **LoHa** (Hadamard product): ΔW = s · (U₁V₁) ⊙ (U₂V₂) with U_i d × r, V_i r × k. Entry by
  entry, (U₁V₁) ⊙ (U₂V₂) = Σ_{i,j} (u₁ᵢ ⊙ u₂ⱼ)(v₁ᵢ ⊙ v₂ⱼ)ᵀ, so ΔW = s · U'V' with the
  column-wise Khatri–Rao factors U' (d × r², columns u₁ᵢ ⊙ u₂ⱼ) and V' (r² × k, rows
  v₁ᵢ ⊙ v₂ⱼ): a rank-≤r² product that :func:`ddiscan.spectral.update_spectrum` scores
  through an r² × r² core (:func:`khatri_rao`).
* **LoKr** (Kronecker product): ΔW = s · W₁ ⊗ W₂ with W₁ = U₁V₁ (a × c) and W₂ = U₂V₂
  (b × e), each full (U = W, V = I) or low-rank. The singular values of W₁ ⊗ W₂ are the
  products σᵢ(W₁)σⱼ(W₂), its singular vectors the Kronecker products of the factors', so
  S and ‖ΔW‖_F come from the two factors' small cores (:func:`kron_spectrum`) and O from
  the factors against W0's basis, never forming the d × k matrix (:func:`kron_deviation`).
* **Tucker** (LoHa's ``hada_t1``/``hada_t2``, LoKr's ``lokr_t2``, convolutions):
  PEFT's and LyCORIS's ``rebuild[p, c, …] = Σ_{i,j} t[i, j, …] w_b[j, c] w_a[i, p]``,
  flattened to (out, in·kh·kw), is the rank-≤r product w_aᵀ · T (:func:`tucker_factors`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import spectral

__all__ = ["Kron", "KronSpectrum", "tucker_factors", "khatri_rao", "full_factors", "kron_spectrum",
           "kron_deviation", "kron_dense"]


@dataclass(frozen=True)
class Kron:
    """ΔW / s = (u1 · v1) ⊗ (u2 · v2): u1 a × R₁, v1 R₁ × c, u2 b × R₂, v2 R₂ × e (ΔW is ab × ce)."""

    u1: object
    v1: object
    u2: object
    v2: object

    def asarray(self, xp) -> "Kron":
        return Kron(*(xp.asarray(part) for part in (self.u1, self.v1, self.u2, self.v2)))

    def finite(self, xp) -> bool:
        return all(bool(xp.all(xp.isfinite(part))) for part in (self.u1, self.v1, self.u2, self.v2))


@dataclass(frozen=True)
class KronSpectrum:
    """The spectrum of ΔW = s · W₁ ⊗ W₂ (``whole``) and of its two factors (scale 1)."""

    whole: spectral.Spectrum
    first: spectral.Spectrum
    second: spectral.Spectrum


def tucker_factors(core, wa, wb, *, xp):
    """``(up, down)`` with up · down = PEFT's/LyCORIS's Tucker rebuild, flattened.

    Parameters
    ----------
    core : array, shape (r, r, *spatial)
        ``hada_t1``/``hada_t2``/``lokr_t2``.
    wa : array, shape (r, d)
        The output-side factor (``hada_w1_a``, ``lokr_w2_a``).
    wb : array, shape (r, c)
        The input-side factor (``hada_w1_b``, ``lokr_w2_b``).

    Returns
    -------
    up : array, shape (d, r)
        waᵀ.
    down : array, shape (r, c · prod(spatial))
        T[i, (c, …)] = Σ_j core[i, j, …] · wb[j, c], columns in PyTorch's flattening order.

    Notes
    -----
    Cost O(r² · c · prod(spatial)), the size of the factors; nothing d × c is formed.
    """
    rank, inner = core.shape[0], core.shape[1]
    spatial = math.prod(core.shape[2:])
    flat = xp.reshape(core, (rank, inner, spatial))
    mixed = xp.tensordot(flat, wb, axes=([1], [0]))  # (r, spatial, c)
    down = xp.reshape(xp.permute_dims(mixed, (0, 2, 1)), (rank, wb.shape[1] * spatial))
    return xp.linalg.matrix_transpose(wa), down


def khatri_rao(up1, down1, up2, down2, *, xp):
    """``(U', V')`` with U' · V' = (up1 · down1) ⊙ (up2 · down2), the LoHa core's factors.

    U'[:, i·r₂ + j] = up1[:, i] ⊙ up2[:, j] (d × r₁r₂), V'[i·r₂ + j, :] = down1[i] ⊙ down2[j]
    (r₁r₂ × k).

    Notes
    -----
    Cost O((d + k) r₁ r₂) time and memory; scoring the pair through
    :func:`ddiscan.spectral.update_spectrum` then costs O((d + k)(r₁r₂)² + (r₁r₂)³), the
    r × r trick for a rank-r₁r₂ update, instead of forming and decomposing d × k.
    """
    rank = up1.shape[1] * up2.shape[1]
    up = xp.reshape(up1[:, :, None] * up2[:, None, :], (up1.shape[0], rank))
    down = xp.reshape(down1[:, None, :] * down2[None, :, :], (rank, down1.shape[1]))
    return up, down


def full_factors(matrix, *, xp):
    """``(up, down)`` of a full matrix with at most min(rows, cols) columns: (W, I) or (I, W)."""
    rows, cols = matrix.shape
    if cols <= rows:
        return matrix, xp.eye(cols, dtype=matrix.dtype)
    return xp.eye(rows, dtype=matrix.dtype), matrix


def kron_spectrum(kron: Kron, scale: float, *, xp) -> KronSpectrum:
    """Singular values of ΔW = s · W₁ ⊗ W₂ from the factors' own (SPEC.md §11.2).

    σ(W₁ ⊗ W₂) = {σᵢ(W₁) σⱼ(W₂)}, so the unit spectrum is the outer product of the two
    factors' (each from :func:`ddiscan.spectral.update_spectrum`), Σσ² = ‖W₁‖²‖W₂‖² and
    σ₁ = σ₁(W₁)σ₁(W₂): S and ‖ΔW‖_F are exact from the factors.

    Notes
    -----
    Cost O((a + c) R₁² + (b + e) R₂² + R₁R₂ log(R₁R₂)).
    """
    first = spectral.update_spectrum(kron.u1, kron.v1, 1.0, xp=xp)
    second = spectral.update_spectrum(kron.u2, kron.v2, 1.0, xp=xp)
    products = xp.reshape(first.unit[:, None] * second.unit[None, :], (-1,))
    unit = -xp.sort(-products)
    whole = spectral.Spectrum(
        unit=unit, r_down=None, factor=abs(scale) * first.factor * second.factor,
        up_factor=first.up_factor * second.up_factor, unit_energy=first.unit_energy * second.unit_energy,
        unit_top=first.unit_top * second.unit_top)
    return KronSpectrum(whole, first, second)


def kron_deviation(basis, kron: Kron, spectrum: KronSpectrum, *, xp) -> float:
    """O = 1 − ‖Q_tᵀ ΔW‖_F² / (‖ΔW‖_F² + ε) for ΔW = s · W₁ ⊗ W₂, clamped to [0, 1].

    A column q of Q_t (length ab) is the a × b matrix Q (row-major), and
    qᵀ(W₁ ⊗ W₂) = vec(W₁ᵀ Q W₂)ᵀ; with W_i = U_i V_i and V_iᵀ = Q_i R_i,
    ‖W₁ᵀ Q W₂‖_F = ‖R₁ (U₁ᵀ Q U₂) R₂ᵀ‖_F, an R₁ × R₂ matrix per column.

    Parameters
    ----------
    basis : array, shape (d, t)
        Orthonormal columns spanning W0's dominant column space; d = a · b.
    kron : Kron
    spectrum : KronSpectrum
        From :func:`kron_spectrum` of the same update.

    Notes
    -----
    Cost O(t · (a b R₁ + b R₁ R₂ + R₁² R₂ + R₁ R₂²)) = O(t d R₁) for the usual small R₁;
    ΔW is never formed.
    """
    a, b = kron.u1.shape[0], kron.u2.shape[0]
    columns = xp.reshape(xp.linalg.matrix_transpose(xp.astype(basis, kron.u1.dtype)), (basis.shape[1], a, b))
    left = xp.linalg.matrix_transpose(kron.u1 * (1.0 / spectrum.first.up_factor))
    right = kron.u2 * (1.0 / spectrum.second.up_factor)
    projected = (left @ columns) @ right  # (t, R₁, R₂)
    captured = (spectrum.first.r_down @ projected) @ xp.linalg.matrix_transpose(spectrum.second.r_down)
    value = 1.0 - spectrum.whole.ratio(float(xp.sum(captured * captured)))
    return min(1.0, max(0.0, value))


def kron_dense(kron: Kron, *, xp):
    """(u1 v1) ⊗ (u2 v2) as a dense (ab × ce) matrix, for checks and small modules."""
    first, second = kron.u1 @ kron.v1, kron.u2 @ kron.v2
    a, c = first.shape
    b, e = second.shape
    blocks = first[:, None, :, None] * second[None, :, None, :]
    return xp.reshape(blocks, (a * b, c * e))
