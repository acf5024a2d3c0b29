"""ddiscan.krylov: the block Krylov range finder, Rayleigh–Ritz and the error bar of O,
against O from a float64 SVD of W0 drawn with controlled spectral gaps."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddiscan import krylov, spectral
from ddiscan.sketch import Sketch, dominant_subspace


def with_spectrum(seed: int, d: int, k: int, sigma: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((d, sigma.size)))
    v, _ = np.linalg.qr(rng.standard_normal((k, sigma.size)))
    return (u * sigma) @ v.T


def flat(n: int, t: int, gap: float, decay: float) -> np.ndarray:
    """Singular values decaying by ``decay`` per index, with σ_t / σ_{t+1} = ``gap``."""
    sigma = decay ** np.arange(n, dtype=np.float64)
    sigma[t:] /= gap
    return sigma


def o_of(basis, up, down) -> float:
    spectrum = spectral.update_spectrum(up, down, 1.0, xp=np)
    return spectral.deviation(basis, up, spectrum, 1.0, xp=np)


def straddling(rng, left, t: int, r: int, k: int):
    """An update half in W0's top 2t left directions (straddling the boundary at t), half random."""
    d = left.shape[0]
    up = math.sqrt(0.5) * left[:, : 2 * t] @ rng.standard_normal((2 * t, r)) + math.sqrt(0.5) * rng.standard_normal(
        (d, r)) * math.sqrt(2 * t / d)
    return up, rng.standard_normal((r, k))


def test_block_krylov_beats_subspace_iteration_at_the_same_passes_on_a_flat_spectrum():
    d, k, t = 300, 200, 8
    w0 = with_spectrum(0, d, k, flat(200, t, 1.02, 0.995)).astype(np.float32)
    left = np.linalg.svd(w0.astype(np.float64))[0]
    rng = np.random.default_rng(1)
    errors = {"krylov": [], "subspace": []}
    for seed in range(4):
        up, down = straddling(rng, left, t, 4, k)
        exact = o_of(left[:, :t], up, down)
        omega = spectral.gaussian_test_matrix(k, t + 8, seed)
        fits = {"krylov": krylov.block_krylov(w0, spectral.gaussian_test_matrix(d, t + 8, seed), t=t, iters=4, xp=np),
                "subspace": krylov.subspace_iteration(w0, omega, t=t, power_iters=4, xp=np)}
        for name, fit in fits.items():
            np.testing.assert_allclose(fit.left.T.astype(np.float64) @ fit.left, np.eye(t), atol=1e-5)
            errors[name].append(abs(o_of(fit.left, up, down) - exact))
    assert max(errors["krylov"]) < 0.5 * max(errors["subspace"])


def test_the_krylov_basis_stays_orthonormal_in_float32_when_the_spectrum_decays_fast():
    # a gap of 2 between consecutive singular values: the blocks are nearly parallel, the
    # Gram matrices ill-conditioned; shifted Cholesky QR keeps Q orthonormal
    w0 = with_spectrum(2, 120, 90, 0.5 ** np.arange(90.0)).astype(np.float32)
    omega = spectral.gaussian_test_matrix(120, 10, 0)
    fit = krylov.block_krylov(w0, omega, t=3, iters=4, xp=np)
    basis = fit.left.astype(np.float64)
    np.testing.assert_allclose(basis.T @ basis, np.eye(3), atol=1e-5)
    u = np.linalg.svd(w0.astype(np.float64))[0][:, :3]
    np.testing.assert_allclose(basis @ basis.T, u @ u.T, atol=1e-4)


def test_a_basis_that_fills_the_space_is_complete_and_exact():
    w0 = with_spectrum(3, 40, 20, flat(20, 4, 1.0, 0.99))  # no gap at all: only a complete basis pins O down
    fit = krylov.block_krylov(w0, spectral.gaussian_test_matrix(40, 12, 0).astype(np.float64), t=4, iters=4, xp=np)
    assert fit.complete and fit.values.size == 20  # the last block cut to fit min(d, k)
    np.testing.assert_allclose(fit.values, np.linalg.svd(w0, compute_uv=False), rtol=1e-8)


def test_the_error_bar_is_one_where_nothing_is_known_and_zero_with_exact():
    assert krylov.error_bar(np.array([2.0, 1.0]), 0.1, t=2, complete=False) == (None, 1.0)
    assert krylov.error_bar(np.array([1.0, 1.0, 1.0]), 0.1, t=1, complete=False) == (1.0, 1.0)
    gap, error = krylov.error_bar(np.array([2.0, 1.0, 0.5]), 0.3, t=1, complete=False)
    assert gap == pytest.approx(2.0) and error == pytest.approx(0.3 / (4.0 - 0.25))
    w0 = with_spectrum(4, 30, 20, flat(20, 3, 1.5, 0.9))
    _, exact = dominant_subspace(w0, t=3, sketch=Sketch(exact=True), xp=np)
    assert exact.error == 0.0 and exact.gap == pytest.approx(1.5 / 0.9, rel=1e-9)


CASES = st.tuples(st.integers(0, 2**31), st.sampled_from([(200, 120), (120, 200), (160, 160)]),
                  st.integers(2, 12), st.floats(1.05, 3.0), st.floats(0.97, 0.999),
                  st.sampled_from(["krylov", "subspace"]), st.integers(2, 4))


def _case(seed, shape, t, gap, decay, kernel, iters):
    d, k = shape
    n = min(d, k)
    w0 = with_spectrum(seed, d, k, flat(n, t, gap, decay)).astype(np.float32)
    left = np.linalg.svd(w0.astype(np.float64))[0]
    rng = np.random.default_rng(seed + 1)
    up, down = straddling(rng, left, t, max(1, t // 2), k)
    sketch = Sketch(seed=seed % 7, kernel=kernel, krylov_iters=iters, power_iters=iters)
    _, subspace = dominant_subspace(w0, t=t, sketch=sketch, xp=np)
    return abs(o_of(subspace.basis, up, down) - o_of(left[:, :t], up, down)), subspace


@settings(derandomize=True, max_examples=40, deadline=None)
@given(CASES)
def test_the_error_bar_holds_against_the_exact_o(case):
    """On every drawn case of this fixed (derandomized) sample the estimate holds; SPEC.md §2
    documents it as an estimate that benchmarks/KRYLOV.md found exceeded in none of its cases."""
    error, subspace = _case(*case)
    assert 0.0 <= subspace.error <= 1.0
    assert error <= subspace.error + 1e-6
    if subspace.gap is not None:
        assert subspace.gap >= 1.0


def test_the_error_bar_is_exceeded_at_most_at_the_documented_rate():
    """Over a fixed sample of 40 cases per kernel with small gaps, the share of cases whose
    true |ΔO| exceeds the error bar stays under the 2 % SPEC.md §2 documents."""
    rng = np.random.default_rng(7)
    exceeded = total = 0
    for kernel in ("krylov", "subspace"):
        for i in range(40):
            case = (int(rng.integers(2**31)), [(200, 120), (120, 200)][i % 2], int(rng.integers(2, 10)),
                    float(rng.uniform(1.0, 1.2)), float(rng.uniform(0.98, 0.999)), kernel, int(rng.integers(1, 4)))
            error, subspace = _case(*case)
            exceeded += error > subspace.error
            total += 1
    assert exceeded / total <= 0.02


def test_a_profile_records_the_kernel_that_built_it(tmp_path):
    from pathlib import Path

    import ddiscan
    from ddiscan.options import OptionError
    from ddiscan.profile import Profile

    base = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-llama"
    for kernel in ("krylov", "subspace"):
        path = tmp_path / f"{kernel}.ddiprofile"
        ddiscan.build_profile(base, path, max_t=4, sketch=kernel, krylov_iters=3)
        parameters = Profile(path).parameters
        assert parameters["sketch"] == kernel and parameters["krylov_iters"] == 3
    with pytest.raises(OptionError):
        ddiscan.build_profile(base, tmp_path / "bad.ddiprofile", max_t=4, sketch="lanczos")
    assert not (tmp_path / "bad.ddiprofile").exists()


def test_small_dense_problems_run_on_one_blas_thread():
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(2, user_api="blas"):
        with spectral.one_thread():
            assert {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"} == {1}
        assert all(lib["num_threads"] >= 1 for lib in threadpool_info() if lib["user_api"] == "blas")


@settings(derandomize=True, max_examples=25, deadline=None)
@given(st.integers(0, 2**31), st.integers(4, 12), st.floats(1.05, 2.0), st.sampled_from(["krylov", "subspace"]),
       st.sampled_from([(160, 120), (120, 160)]))
def test_the_error_bar_of_a_smaller_t_and_of_the_other_basis_hold(seed, t, gap, kernel, shape):
    """What a profile keeps for a scan with a smaller t (the prefix residuals) and for a
    transposed module (the other side's basis, by other_side) bounds |O − O_exact| there too
    (W0 with a gap at t/2 and at t, as the other cases have one at t)."""
    d, k = shape
    sigma = flat(min(d, k), t, gap, 0.99)
    sigma[t // 2:] /= gap
    w0 = with_spectrum(seed, d, k, sigma).astype(np.float32)
    u, _, vt = np.linalg.svd(w0.astype(np.float64))
    sketch = Sketch(seed=seed % 5, kernel=kernel, krylov_iters=3, power_iters=3)
    ritz, _ = dominant_subspace(w0, t=t, sketch=sketch, xp=np, right=True)
    assert ritz.prefix.shape == (t,) and ritz.prefix[-1] == ritz.residual
    assert np.all(np.diff(ritz.prefix) >= -1e-12)
    assert ritz.side == ("right" if kernel == "krylov" and d > k else "left")
    rng = np.random.default_rng(seed)
    for size in (t // 2, t):
        for side, basis, exact, n in (("left", ritz.left, u, k), ("right", ritz.right, vt.T, d)):
            _, error = ritz.error_bar(size, side=side)
            up, down = straddling(rng, exact, size, 2, n)
            assert abs(o_of(basis[:, :size], up, down) - o_of(exact[:, :size], up, down)) <= error + 1e-6
    iterated, other = ritz.error_bar(t, side=ritz.side)[1], ritz.error_bar(t, side={"left": "right",
                                                                                       "right": "left"}[ritz.side])[1]
    assert other == pytest.approx(krylov.other_side(iterated))


def test_other_side_grows_the_error_bar_as_tan_does():
    assert krylov.other_side(0.0) == 0.0
    assert krylov.other_side(0.6) == pytest.approx(0.75)
    assert krylov.other_side(0.71) == 1.0 and krylov.other_side(1.0) == 1.0
