"""ddiscan.sketch: the one way Q_t is computed (scan and profile), against a full float64 SVD."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ddiscan.sketch import Sketch, dominant_basis


def decaying(seed: int, d: int, k: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = min(d, k)
    u, _ = np.linalg.qr(rng.standard_normal((d, n)))
    v, _ = np.linalg.qr(rng.standard_normal((k, n)))
    return (u * 0.5 ** np.arange(n)) @ v.T  # a gap of 2 between consecutive singular values


def projector(q) -> np.ndarray:
    return np.asarray(q, np.float64) @ np.asarray(q, np.float64).T


@given(st.integers(0, 2**31), st.integers(4, 40), st.integers(4, 40), st.integers(1, 4), st.booleans())
def test_dominant_basis_spans_w0s_top_t_space(seed, d, k, t, exact):
    w0 = decaying(seed, d, k)
    q = dominant_basis(w0.astype(np.float64), t=t, sketch=Sketch(exact=exact), xp=np)
    u = np.linalg.svd(w0)[0][:, :t]
    assert q.shape == (d, t)
    np.testing.assert_allclose(np.asarray(q).T @ np.asarray(q), np.eye(t), atol=1e-8)
    np.testing.assert_allclose(projector(q), u @ u.T, atol=1e-6)


def test_the_right_basis_and_the_test_matrix_cache():
    w0 = decaying(3, 30, 20)
    omegas: dict = {}
    left, right = dominant_basis(w0, t=3, sketch=Sketch(), xp=np, right=True, omegas=omegas)
    v = np.linalg.svd(w0)[2][:3].T
    np.testing.assert_allclose(projector(right), v @ v.T, atol=1e-6)
    # Ω kept per (rows, width, dtype) for the next weight: block Krylov iterates on the smaller
    # side of this 30 × 20 W0, so Ω has max(d, k) = 30 rows
    assert list(omegas) == [(30, 11, "float64")]
    again = dominant_basis(w0, t=3, sketch=Sketch(), xp=np, omegas=omegas)
    np.testing.assert_array_equal(again, left)


def test_the_seed_is_the_only_randomness():
    w0 = decaying(5, 25, 25) + 1e-3 * np.random.default_rng(0).standard_normal((25, 25))
    one = dominant_basis(w0, t=2, sketch=Sketch(seed=1, power_iters=0), xp=np)
    assert np.array_equal(one, dominant_basis(w0, t=2, sketch=Sketch(seed=1, power_iters=0), xp=np))
    assert not np.array_equal(one, dominant_basis(w0, t=2, sketch=Sketch(seed=2, power_iters=0), xp=np))


def test_sketch_defaults_are_the_scans():
    from ddiscan.options import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS

    assert (Sketch().oversample, Sketch().power_iters, Sketch().exact) == (DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS,
                                                                           False)
    with pytest.raises(TypeError):
        Sketch(8)
