"""ddiscan.structured: LoHa's Khatri–Rao core and LoKr's Kronecker core equal the dense path.

Every structured result (S, ‖ΔW‖_F, O) is compared with numpy SVDs of the explicit dense ΔW
(no ddiscan code in the reference), on shapes and ranks drawn by hypothesis; the Tucker
rebuild is compared with PEFT's own ``make_weight_cp`` formulas.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddiscan import spectral, structured
from ddiscan.structured import Kron

EPS = 1e-6
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


def dense_scores(delta: np.ndarray, basis: np.ndarray) -> tuple[float, float, float]:
    """S, ‖ΔW‖_F and O of a dense ΔW from SPEC.md §2, by numpy's SVD."""
    sigma = np.linalg.svd(delta, compute_uv=False)
    energy = float(np.sum(sigma**2))
    captured = float(np.sum((basis.T @ delta) ** 2))
    return sigma[0] ** 2 / (energy + EPS), np.sqrt(energy), min(1.0, max(0.0, 1 - captured / (energy + EPS)))


def a_basis(rng, d: int, t: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((d, t)))[0]


@SETTINGS
@given(d=st.integers(1, 24), k=st.integers(1, 24), r1=st.integers(1, 5), r2=st.integers(1, 5),
       scale=st.floats(-4, 4).filter(lambda s: abs(s) > 1e-3), seed=st.integers(0, 2**16))
def test_the_khatri_rao_core_equals_the_dense_hadamard_update(d, k, r1, r2, scale, seed):
    rng = np.random.default_rng(seed)
    u1, v1 = rng.standard_normal((d, r1)), rng.standard_normal((r1, k))
    u2, v2 = rng.standard_normal((d, r2)), rng.standard_normal((r2, k))
    delta = scale * (u1 @ v1) * (u2 @ v2)
    up, down = structured.khatri_rao(u1, v1, u2, v2, xp=np)
    assert up.shape == (d, r1 * r2) and down.shape == (r1 * r2, k)
    np.testing.assert_allclose(scale * up @ down, delta, rtol=1e-10, atol=1e-10)
    basis = a_basis(rng, d, min(d, r1))
    spectrum = spectral.update_spectrum(up, down, scale, xp=np)
    sharp, norm, dev = dense_scores(delta, basis)
    assert spectral.sharpness(spectrum) == pytest.approx(sharp, rel=1e-8, abs=1e-10)
    assert spectrum.norm == pytest.approx(norm, rel=1e-10)
    assert spectral.deviation(basis, up, spectrum, scale, xp=np) == pytest.approx(dev, rel=1e-7, abs=1e-9)


def _kron_part(rng, rows: int, cols: int, rank: int | None):
    if rank is None:
        return structured.full_factors(rng.standard_normal((rows, cols)), xp=np)
    return rng.standard_normal((rows, rank)), rng.standard_normal((rank, cols))


@SETTINGS
@given(a=st.integers(1, 6), c=st.integers(1, 6), b=st.integers(1, 8), e=st.integers(1, 8),
       r1=st.one_of(st.none(), st.integers(1, 4)), r2=st.one_of(st.none(), st.integers(1, 4)),
       scale=st.floats(-4, 4).filter(lambda s: abs(s) > 1e-3), seed=st.integers(0, 2**16))
def test_the_kronecker_core_equals_the_dense_kronecker_update(a, c, b, e, r1, r2, scale, seed):
    rng = np.random.default_rng(seed)
    kron = Kron(*_kron_part(rng, a, c, r1), *_kron_part(rng, b, e, r2))
    delta = scale * np.kron(kron.u1 @ kron.v1, kron.u2 @ kron.v2)
    np.testing.assert_allclose(scale * structured.kron_dense(kron, xp=np), delta, rtol=1e-12, atol=1e-12)
    basis = a_basis(rng, a * b, min(a * b, 3))
    spectrum = structured.kron_spectrum(kron, scale, xp=np)
    sharp, norm, dev = dense_scores(delta, basis)
    dense_sigma = np.linalg.svd(delta, compute_uv=False)
    sigma = np.asarray(spectrum.whole.sigma)
    np.testing.assert_allclose(sigma[:dense_sigma.size], dense_sigma[:sigma.size], rtol=1e-8, atol=1e-9)
    assert spectral.sharpness(spectrum.whole) == pytest.approx(sharp, rel=1e-8, abs=1e-10)
    assert spectrum.whole.norm == pytest.approx(norm, rel=1e-10)
    assert structured.kron_deviation(basis, kron, spectrum, xp=np) == pytest.approx(dev, rel=1e-7, abs=1e-9)


def test_a_zero_kronecker_factor_gives_a_zero_update():
    rng = np.random.default_rng(0)
    kron = Kron(np.zeros((2, 1)), np.zeros((1, 3)), *_kron_part(rng, 4, 5, None))
    spectrum = structured.kron_spectrum(kron, 2.0, xp=np)
    assert spectrum.whole.norm == 0 and spectral.sharpness(spectrum.whole) == 0
    assert structured.kron_deviation(a_basis(rng, 8, 2), kron, spectrum, xp=np) == 1.0


@pytest.mark.parametrize("spatial", [(3, 3), (3, 1), (2,), (1, 1)])
def test_tucker_factors_rebuild_as_peft_does(spatial):
    """PEFT's LoHa ``make_weight_cp`` ("i j k l, j r, i p -> p r k l") and LoKr's
    ("i j k l, i p, j r -> p r k l"), flattened to (out, in · kernel)."""
    torch.manual_seed(0)
    rank, out, inp = 3, 5, 4
    core = torch.randn(rank, rank, *spatial, dtype=torch.float64)
    wa, wb = torch.randn(rank, out, dtype=torch.float64), torch.randn(rank, inp, dtype=torch.float64)
    letters = "kl"[:len(spatial)]
    peft_loha = torch.einsum(f"i j {' '.join(letters)}, j r, i p -> p r {' '.join(letters)}", core, wb, wa)
    peft_lokr = torch.einsum(f"i j {' '.join(letters)}, i p, j r -> p r {' '.join(letters)}", core, wa, wb)
    up, down = structured.tucker_factors(core.numpy(), wa.numpy(), wb.numpy(), xp=np)
    assert up.shape == (out, rank) and down.shape == (rank, inp * int(np.prod(spatial)))
    for rebuilt in (peft_loha, peft_lokr):
        np.testing.assert_allclose(up @ down, rebuilt.reshape(out, -1).numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4)])
def test_full_factors_keep_the_matrix_with_the_smaller_side_as_rank(shape):
    matrix = np.random.default_rng(1).standard_normal(shape)
    up, down = structured.full_factors(matrix, xp=np)
    assert up.shape[1] == min(shape)
    np.testing.assert_array_equal(up @ down, matrix)
