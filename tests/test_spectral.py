"""The kernels of ddiscan/spectral.py against an independent dense float64 reference.

The reference below is written from SPEC.md §2–3 and shares no code with ddiscan: it forms
ΔW = s·U·V explicitly, takes σ(ΔW) and W0's top-t left singular vectors from
``numpy.linalg.svd``, and evaluates the formulas with ε = 1e-6 and O clamped to [0, 1].
The same kernels are then run through ``array_api_strict`` (the CPU stand-in for the CuPy
path) and must give the numpy answers.
"""

from __future__ import annotations

import math

import array_api_strict
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddiscan import spectral
from ddiscan.io.convert import widen

EPS = 1e-6
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------
# The reference (SPEC.md §2–3, dense, float64)


def reference(w0, up, down, scale, t):
    """Every quantity of SPEC.md §2–3 from the dense ΔW and full SVDs, in float64."""
    w0 = np.asarray(w0, dtype=np.float64)
    delta = scale * (np.asarray(up, np.float64) @ np.asarray(down, np.float64))
    sigma = np.linalg.svd(delta, compute_uv=False)
    energy = float(np.sum(delta * delta))
    sharp = float(sigma[0] ** 2) / (energy + EPS) if sigma.size else 0.0
    left = np.linalg.svd(w0, full_matrices=False)[0][:, :t]
    inside = float(np.sum((left.T @ delta) ** 2))
    dev = min(1.0, max(0.0, 1.0 - inside / (energy + EPS)))
    delta_norm = math.sqrt(energy)
    base_norm = float(np.linalg.norm(w0))
    mag = delta_norm / (base_norm + EPS)
    mag_norm = delta_norm / (base_norm + delta_norm + EPS)
    ddi = sharp * dev * mag_norm
    return dict(
        sigma=sigma, energy=energy, sharpness=sharp, deviation=dev, magnitude=mag,
        magnitude_norm=mag_norm, ddi=ddi, ddi_raw=sharp * dev * mag, ddi_norm=ddi / (1 + ddi),
        delta_norm=delta_norm, base_norm=base_norm,
    )


def close(actual, expected, rel=1e-6, abs_=1e-12):
    return abs(actual - expected) <= rel * abs(expected) + abs_


def kernels(w0, up, down, scale, t, *, xp=np, basis=None, base_norm=None):
    """The same quantities from ddiscan's kernels (exact basis unless one is given); ‖W0‖
    from ddiscan's one-pass widening (``widen``) unless given."""
    spectrum = spectral.update_spectrum(up, down, scale, xp=xp)
    if basis is None:
        basis = spectral.exact_basis(w0, t=t, xp=xp)
    sharp = spectral.sharpness(spectrum)
    dev = spectral.deviation(basis, up, spectrum, scale, xp=xp)
    delta_norm = math.sqrt(spectrum.energy)
    if base_norm is None:
        base_norm = widen(w0, w0.dtype)[1]
    mag = spectral.magnitude(delta_norm, base_norm)
    mag_norm = spectral.magnitude_norm(delta_norm, base_norm)
    ddi = sharp * dev * mag_norm
    return dict(
        sigma=np.asarray(spectrum.sigma), energy=spectrum.energy, sharpness=sharp, deviation=dev,
        magnitude=mag, magnitude_norm=mag_norm, ddi=ddi, ddi_raw=sharp * dev * mag,
        ddi_norm=ddi / (1 + ddi), delta_norm=delta_norm, base_norm=base_norm,
    )


# ---------------------------------------------------------------------------------------
# Inputs


def base_weight(rng, d, k, decay):
    """A Gaussian W0, or one with a geometric/polynomial spectrum (generic singular gaps)."""
    g = rng.standard_normal((d, k))
    if decay == "gaussian":
        return g
    n = min(d, k)
    qu, _ = np.linalg.qr(rng.standard_normal((d, n)))
    qv, _ = np.linalg.qr(rng.standard_normal((k, n)))
    i = np.arange(n)
    sig = 0.93 ** i if decay == "geometric" else 1.0 / (1.0 + i) ** 0.7
    sig = sig * (1 + 0.01 * rng.random(n))  # break exact ties
    return (qu * np.sort(sig)[::-1]) @ qv.T


def lora_update(rng, d, k, r, kind):
    """(U, V) for ΔW = s·U·V: Gaussian, rank-deficient (repeated / zero columns), or zero."""
    up = rng.standard_normal((d, r)) * 0.1
    down = rng.standard_normal((r, k)) / math.sqrt(k)
    if kind == "repeated" and r > 1:
        up[:, 1:] = up[:, :1]  # every column of U the same: rank 1
        down[r // 2:] = down[:1]
    elif kind == "zero_cols":
        up[:, ::2] = 0.0
        down[1::3] = 0.0
    elif kind == "zero":
        up[:] = 0.0
        down[:] = 0.0
    elif kind == "zero_up":
        up[:] = 0.0
    return up, down


SCALES = st.one_of(
    st.sampled_from([1.0, 2.0, -1.0, -0.5, 16.0, 1e-3, -1e-4, 1e-8, -1e-8, 1e-12, 3e3]),
    st.floats(-100, 100, allow_nan=False, allow_infinity=False),
)


@st.composite
def cases(draw, max_dim=200):
    d = draw(st.integers(1, max_dim))
    k = draw(st.integers(1, max_dim))
    r = draw(st.integers(1, 16))
    t = draw(st.integers(1, min(d, k)))
    scale = draw(SCALES)
    kind = draw(st.sampled_from(["gaussian", "gaussian", "repeated", "zero_cols", "zero", "zero_up"]))
    decay = draw(st.sampled_from(["gaussian", "geometric", "polynomial"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    w0 = base_weight(rng, d, k, decay)
    up, down = lora_update(rng, d, k, r, kind)
    return w0, up, down, scale, t


# ---------------------------------------------------------------------------------------
# Exact path: within 1e-6 of the reference


@SETTINGS
@given(cases())
def test_exact_kernels_match_dense_reference(case):
    w0, up, down, scale, t = case
    ref = reference(w0, up, down, scale, t)
    got = kernels(w0, up, down, scale, t)
    n = got["sigma"].shape[0]
    assert n <= ref["sigma"].shape[0] + up.shape[1]
    # σ(ΔW) from the r × r core: the nonzero singular values, descending, the rest zero
    ref_sigma = np.zeros(max(n, ref["sigma"].shape[0]))
    ref_sigma[: ref["sigma"].shape[0]] = ref["sigma"]
    assert np.all(np.diff(got["sigma"]) <= 1e-12 * (ref_sigma[0] + 1e-300))
    # A singular value that is exactly 0 (rank-deficient factors) comes out of a Cholesky R
    # factor as O(√ε · |s|·‖U‖₂‖V‖₂), not 0: a perturbation ε‖G‖ of a singular Gram matrix G
    # moves its factor by √(ε‖G‖). Its square (what S, O and M use) is at the ε level.
    zero_level = 1e-7 * abs(scale) * np.linalg.norm(up, 2) * np.linalg.norm(down, 2) + 1e-300
    np.testing.assert_allclose(got["sigma"], ref_sigma[:n], rtol=1e-6, atol=zero_level)
    assert np.all(ref_sigma[n:] <= zero_level)
    for name in ("energy", "sharpness", "deviation", "magnitude", "magnitude_norm", "ddi", "ddi_raw",
                 "ddi_norm", "delta_norm", "base_norm"):
        abs_ = 1e-12 if name != "energy" else 1e-12 * ref["energy"] + 1e-300
        if name in ("deviation", "ddi", "ddi_raw", "ddi_norm"):
            # O = 1 − ratio loses absolute precision ~1e-15 when the ratio is near 1
            abs_ = 1e-10
        assert close(got[name], ref[name], abs_=abs_), (name, got[name], ref[name])
    assert 0.0 <= got["sharpness"] <= 1.0
    assert 0.0 <= got["deviation"] <= 1.0
    assert 0.0 <= got["magnitude_norm"] < 1.0


@pytest.mark.parametrize("shape", [(7, 5, 3), (40, 90, 8), (128, 32, 16), (1, 1, 1)])
def test_zero_update_has_no_sharpness_full_deviation_and_no_index(shape):
    d, k, r = shape
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((d, k))
    up, down = np.zeros((d, r)), np.zeros((r, k))
    got = kernels(w0, up, down, 2.0, min(r, d, k))
    ref = reference(w0, up, down, 2.0, min(r, d, k))
    assert got["sharpness"] == ref["sharpness"] == 0.0
    assert got["deviation"] == ref["deviation"] == 1.0
    assert got["ddi"] == ref["ddi"] == 0.0
    assert got["magnitude"] == got["magnitude_norm"] == got["delta_norm"] == 0.0


def test_update_inside_and_outside_the_dominant_subspace():
    """O ≈ 0 for ΔW in W0's top-t column space, O ≈ 1 for ΔW orthogonal to it."""
    rng = np.random.default_rng(2)
    w0 = base_weight(rng, 60, 50, "geometric")
    left = np.linalg.svd(w0)[0]
    down = rng.standard_normal((4, 50))
    inside = kernels(w0, left[:, :4] @ rng.standard_normal((4, 4)), down, 1.5, 4)
    outside = kernels(w0, left[:, 10:14] @ rng.standard_normal((4, 4)), down, 1.5, 4)
    assert inside["deviation"] < 1e-9
    assert outside["deviation"] > 1 - 1e-9


@SETTINGS
@given(st.integers(1, 700), st.integers(1, 300), st.integers(1, 4096),
       st.sampled_from(["float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"]),
       st.sampled_from(["float32", "float64"]), st.integers(0, 2**32 - 1))
def test_widen_is_exact_and_its_norm_accumulates_blocks(d, k, block, dtype, out, seed):
    import ddiscan.io.convert as convert

    w0 = np.random.default_rng(seed).standard_normal((d, k)).astype(np.dtype(getattr(ml_dtypes, dtype, dtype)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(convert, "BLOCK", block)  # block boundaries anywhere
        widened, norm = widen(w0, out)
    assert widened.dtype == np.dtype(out) and widened.shape == (d, k)
    if np.dtype(out).itemsize >= w0.dtype.itemsize:  # widening is exact
        assert np.array_equal(widened, w0.astype(out))
    expected = float(np.linalg.norm(w0.astype(np.float64)))
    assert close(norm, expected, rel=1e-6 if out == "float32" else 1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 200), st.integers(1, 40), st.integers(0, 2**63 - 1))
def test_gaussian_test_matrix_is_a_function_of_seed_and_shape(k, width, seed):
    a = spectral.gaussian_test_matrix(k, width, seed)
    b = spectral.gaussian_test_matrix(k, width, seed)
    assert a.dtype == np.float32 and a.shape == (k, width)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, spectral.gaussian_test_matrix(k, width, seed ^ 1))


# ---------------------------------------------------------------------------------------
# Randomized basis


@settings(max_examples=40, deadline=None)
@given(cases(max_dim=150), st.integers(0, 12), st.integers(0, 3), st.integers(0, 1000))
def test_randomized_basis_is_orthonormal_and_deviation_in_range(case, oversample, power_iters, seed):
    w0, up, down, scale, t = case
    d, k = w0.shape
    width = min(t + oversample, d, k)
    omega = spectral.gaussian_test_matrix(k, width, seed)
    w32 = w0.astype(np.float32)
    basis = spectral.randomized_basis(w32, omega, t=t, power_iters=power_iters, xp=np)
    assert basis.shape == (d, min(t, width))
    np.testing.assert_allclose(basis.T.astype(np.float64) @ basis, np.eye(basis.shape[1]), atol=1e-5)
    got = kernels(w0, up, down, scale, t, basis=basis)
    assert 0.0 <= got["deviation"] <= 1.0
    if width == min(d, k) and d <= k:
        # the sample spans all of R^d: the randomized subspace is the exact one
        ref = reference(w32, up, down, scale, t)
        assert abs(got["deviation"] - ref["deviation"]) < 1e-4


def _slow_spectrum_case(seed, d=200, k=160, r=8):
    """Polynomially decaying spectrum σ_i = (1 + i)^-0.5 and an update half inside W0's top space."""
    rng = np.random.default_rng(seed)
    n = min(d, k)
    qu, _ = np.linalg.qr(rng.standard_normal((d, n)))
    qv, _ = np.linalg.qr(rng.standard_normal((k, n)))
    sig = (1.0 + np.arange(n)) ** -0.5
    w0 = (qu * sig) @ qv.T
    up = 0.5 * qu[:, :r] @ rng.standard_normal((r, r)) + 0.05 * rng.standard_normal((d, r))
    down = rng.standard_normal((r, k)) / math.sqrt(k)
    return w0, up, down


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_deviation_converges_to_exact_with_power_iterations(seed):
    w0, up, down = _slow_spectrum_case(seed)
    r = up.shape[1]
    exact = reference(w0, up, down, 2.0, r)["deviation"]
    omega = spectral.gaussian_test_matrix(w0.shape[1], r + 8, seed)
    w32 = w0.astype(np.float32)
    errors = []
    for p in (0, 1, 2, 4, 8):
        basis = spectral.randomized_basis(w32, omega, t=r, power_iters=p, xp=np)
        errors.append(abs(kernels(w0, up, down, 2.0, r, basis=basis)["deviation"] - exact))
    # a single pass is visibly off on a slowly decaying spectrum ...
    assert errors[0] > 1e-3, errors
    # ... and power iterations shrink the error (allowing small non-monotone wiggles) ...
    for before, after in zip(errors, errors[1:]):
        assert after <= 1.5 * before + 2e-5, errors
    assert errors[-1] < errors[0] / 10, errors
    # ... to a small fraction of O
    assert errors[-1] < 1e-2 * exact, (errors, exact)


# ---------------------------------------------------------------------------------------
# The array API path (CuPy on the GPU; array_api_strict on the CPU)


@settings(max_examples=40, deadline=None)
@given(cases(max_dim=120), st.integers(0, 2))
def test_array_api_strict_gives_the_numpy_results(case, power_iters):
    w0, up, down, scale, t = case
    xs = array_api_strict
    sw0, sup, sdown = xs.asarray(w0), xs.asarray(up), xs.asarray(down)
    np_exact = kernels(w0, up, down, scale, t)
    xs_exact = kernels(sw0, sup, sdown, scale, t, xp=xs, base_norm=np_exact["base_norm"])
    for name, value in np_exact.items():
        if name == "sigma":
            np.testing.assert_allclose(np.asarray(xs_exact[name]), value, rtol=1e-12, atol=1e-300)
        else:
            assert close(xs_exact[name], value, rel=1e-12, abs_=1e-15), name

    d, k = w0.shape
    width = min(t + 8, d, k)
    omega = spectral.gaussian_test_matrix(k, width, 0)
    w32 = w0.astype(np.float32)
    np_basis = spectral.randomized_basis(w32, omega, t=t, power_iters=power_iters, xp=np)
    xs_basis = spectral.randomized_basis(xs.asarray(w32), xs.asarray(omega), t=t, power_iters=power_iters, xp=xs)
    assert type(xs_basis).__module__.startswith("array_api_strict")
    assert xs_basis.dtype == xs.float32
    np_dev = kernels(w0, up, down, scale, t, basis=np_basis)["deviation"]
    xs_dev = kernels(sw0, sup, sdown, scale, t, xp=xs, basis=xs_basis, base_norm=np_exact["base_norm"])["deviation"]
    assert close(xs_dev, np_dev, rel=1e-5, abs_=1e-6)
