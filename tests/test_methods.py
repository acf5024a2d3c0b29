"""SafeLoRA, SPLoRA's E-DIEM and DDI's component ablation (ddiscan/safelora.py, ddiscan/ediem.py, ddiscan/score.py) against an
independent dense float64 reference, and on a planted aligned/unaligned pair.

The reference below forms what the kernels must never form: the alignment matrix
C = A Aᵀ / ‖A‖_F (d × d, C = 0 for A = 0), ΔW = s·U·L (d × k), C·ΔW, and, for E-DIEM, each
rotated update H_j ΔW = Q_j Q_Uᵀ ΔW as a dense d × k matrix, with Q_j the Q factor of the
Gaussian block G_j from numpy's Householder QR with its signs fixed so R has a positive
diagonal (the kernels use a Cholesky factor instead). Only the seeding rule of the G_j —
``numpy.random.default_rng([seed, d, min(d, r)])``, one (d, min(d, r)) block per sample —
is restated here, as a convention, not imported.
"""

from __future__ import annotations

import math

import array_api_strict
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddiscan import ediem, safelora, spectral
from ddiscan import score as ablation
from selection_helpers import public_lowest_k, ranked

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------
# The dense reference


def dense_alignment(diff):
    diff = np.asarray(diff, np.float64)
    a = float(np.linalg.norm(diff))
    return diff @ diff.T / a if a > 0 else np.zeros((diff.shape[0], diff.shape[0]))


def ref_safelora(diff, up, down, scale):
    """cos(vec(CΔW), vec(ΔW)); 0 when either is the zero vector."""
    c = dense_alignment(diff)
    delta = scale * (np.asarray(up, np.float64) @ np.asarray(down, np.float64))
    x = c @ delta
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(delta))
    inner = float(np.sum(x * delta))
    cos = inner / (nx * ny) if nx * ny > 0 else 0.0
    return dict(cosine=cos, inner=inner, projected_norm=nx, delta_norm=ny)


def haar_frames(diff_dtype, d, m, samples, seed):
    g = np.random.default_rng([seed, d, m]).standard_normal((samples, d, m))
    g = g.astype(diff_dtype).astype(np.float64)
    frames = []
    for block in g:
        q, r = np.linalg.qr(block)
        frames.append(q * np.sign(np.diag(r)))
    return frames


def ref_ediem(diff, up, down, scale, samples, seed):
    """E-DIEM from dense matrices: d(CΔW, ΔW) against d(C·H_jΔW, H_jΔW)."""
    c = dense_alignment(diff)
    up64, down64 = np.asarray(up, np.float64), np.asarray(down, np.float64)
    delta = scale * (up64 @ down64)
    observed = float(np.linalg.norm(c @ delta - delta))
    q_up = np.linalg.qr(up64)[0]  # d × min(d, r): H_j maps span(Q_U) onto span(Q_j)
    dists = []
    for q in haar_frames(np.asarray(diff).dtype, up.shape[0], q_up.shape[1], samples, seed):
        y = q @ (q_up.T @ delta)
        dists.append(float(np.linalg.norm(c @ y - y)))
    dists = np.array(dists)
    mean, std = float(dists.mean()), float(dists.std(ddof=1))
    return dict(distance=observed, mean=mean, std=std, score=(observed - mean) / std if std > 0 else 0.0)


# ---------------------------------------------------------------------------------------
# Inputs


def alignment_diff(rng, d, k, kind, size):
    if kind == "zero":
        return np.zeros((d, k))
    if kind == "gaussian":
        g = rng.standard_normal((d, k))
    else:  # low rank 1–3
        rank = int(kind[-1])
        g = rng.standard_normal((d, rank)) @ rng.standard_normal((rank, k))
    return size * g / np.linalg.norm(g)


def lora_factors(rng, diff, r, kind):
    d, k = diff.shape
    up = rng.standard_normal((d, r)) * 0.1
    down = rng.standard_normal((r, k)) / math.sqrt(k)
    left = np.linalg.svd(diff, full_matrices=True)[0] if np.any(diff) else np.eye(d)
    rank = int(np.linalg.matrix_rank(diff)) if np.any(diff) else 0
    if kind == "repeated" and r > 1:
        up[:, 1:] = up[:, :1]
        down[r // 2:] = down[:1]
    elif kind == "zero_cols":
        up[:, ::2] = 0.0
        down[1::3] = 0.0
    elif kind == "zero":
        up[:] = 0.0
        down[:] = 0.0
    elif kind == "zero_up":
        up[:] = 0.0
    elif kind == "inside" and rank:
        up = left[:, :rank] @ rng.standard_normal((rank, r))
    elif kind == "outside" and rank < d:
        up = left[:, rank:] @ rng.standard_normal((d - rank, r))
    return up, down


SCALES = st.one_of(
    st.sampled_from([1.0, 2.0, -1.0, -0.5, 16.0, 1e-3, -1e-4, 1e-8, -1e-12, 3e3]),
    st.floats(-100, 100, allow_nan=False, allow_infinity=False).filter(lambda s: abs(s) > 1e-30),
)


@st.composite
def cases(draw, max_dim=150):
    d = draw(st.integers(1, max_dim))
    k = draw(st.integers(1, max_dim))
    r = draw(st.integers(1, 8))
    scale = draw(SCALES)
    diff_kind = draw(st.sampled_from(["gaussian", "gaussian", "low1", "low2", "low3", "zero"]))
    size = draw(st.sampled_from([1e-3, 0.3, 1.0, 3.0, 10.0]))
    kind = draw(st.sampled_from(["gaussian", "gaussian", "repeated", "zero_cols", "zero", "zero_up",
                                 "inside", "outside"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    diff = alignment_diff(rng, d, k, diff_kind, size)
    up, down = lora_factors(rng, diff, r, kind)
    return diff, up, down, scale


def close(actual, expected, rel=1e-6, abs_=1e-12):
    return abs(actual - expected) <= rel * abs(expected) + abs_


# ---------------------------------------------------------------------------------------
# SafeLoRA against the dense reference


@SETTINGS
@given(cases())
def test_safelora_matches_dense_reference(case):
    diff, up, down, scale = case
    a = float(np.linalg.norm(diff))
    got = safelora.safelora_score(diff, up, down, scale, diff_norm=a, xp=np)
    ref = ref_safelora(diff, up, down, scale)
    assert 0.0 <= got.cosine <= 1.0
    c = dense_alignment(diff)
    top = float(np.linalg.eigvalsh(c)[-1]) if np.any(c) else 0.0
    if ref["projected_norm"] > 1e-9 * top * ref["delta_norm"]:
        assert abs(got.cosine - ref["cosine"]) <= 1e-9, (got, ref)
    else:  # CΔW is rounding noise in the reference too: ΔW ⟂ A to working precision
        assert got.cosine <= 1e-6 or ref["projected_norm"] > 0, (got, ref)
    # absolute accuracy is relative to ‖C‖₂·‖ΔW‖ (rounding in the products with A)
    assert close(got.delta_norm, ref["delta_norm"], rel=1e-9, abs_=1e-300)
    assert close(got.projected_norm, ref["projected_norm"], rel=1e-8, abs_=1e-12 * top * ref["delta_norm"] + 1e-300)
    assert close(got.inner, ref["inner"], rel=1e-8, abs_=1e-12 * top * ref["delta_norm"] ** 2 + 1e-300)
    # C·lora_B, SafeLoRA's rewrite: ΔW becomes CΔW
    projected = safelora.project_up(diff, up, diff_norm=a, xp=np)
    dense = c @ up
    assert projected.shape == up.shape and projected.dtype == np.float64
    np.testing.assert_allclose(projected, dense, rtol=1e-9, atol=1e-12 * top * float(np.linalg.norm(up)) + 1e-300)
    # the cosine does not see s, nor the sign of ΔW
    flipped = safelora.safelora_score(diff, -up, down, 1.0, diff_norm=a, xp=np)
    assert abs(flipped.cosine - got.cosine) <= 1e-12


@pytest.mark.parametrize("shape", [(7, 5, 3), (40, 90, 8), (1, 1, 1), (3, 20, 8)])
def test_safelora_degenerate_conventions(shape):
    """Zero ΔW, zero A (C = 0) and ΔW ⟂ A's column space all give cosine 0 (as torch's
    cosine_similarity, which the public code uses); the rewrite of a zero A is zeros."""
    d, k, r = shape
    rng = np.random.default_rng(3)
    diff = rng.standard_normal((d, k))
    up, down = rng.standard_normal((d, r)), rng.standard_normal((r, k))
    a = float(np.linalg.norm(diff))
    zero_update = safelora.safelora_score(diff, np.zeros((d, r)), down, 2.0, diff_norm=a, xp=np)
    assert zero_update.cosine == 0.0 and zero_update.delta_norm == 0.0 and zero_update.inner == 0.0
    zero_diff = safelora.safelora_score(np.zeros((d, k)), up, down, 2.0, diff_norm=0.0, xp=np)
    assert zero_diff.cosine == 0.0 == ref_safelora(np.zeros((d, k)), up, down, 2.0)["cosine"]
    assert zero_diff.projected_norm == 0.0 and zero_diff.delta_norm > 0
    assert not np.any(safelora.project_up(np.zeros((d, k)), up, diff_norm=0.0, xp=np))
    if d > 1:  # A of rank 1 and ΔW orthogonal to its column
        col = rng.standard_normal(d)
        rank1 = np.outer(col, rng.standard_normal(k))
        other = rng.standard_normal((d, r))
        other -= np.outer(col, col @ other) / (col @ col)
        got = safelora.safelora_score(rank1, other, down, 1.0, diff_norm=float(np.linalg.norm(rank1)), xp=np)
        assert got.cosine < 1e-12
    # a module entirely inside A's column space, with C acting as a multiple of the identity there
    q = np.linalg.qr(rng.standard_normal((d, min(d, k))))[0]
    w = np.linalg.qr(rng.standard_normal((k, min(d, k))))[0]
    iso = q @ w.T
    inside = q @ rng.standard_normal((q.shape[1], r))
    got = safelora.safelora_score(iso, inside, down, -3.0, diff_norm=float(np.linalg.norm(iso)), xp=np)
    assert abs(got.cosine - 1.0) < 1e-12


def test_non_finite_inputs_give_non_finite_scores():
    rng = np.random.default_rng(4)
    diff, up, down = rng.standard_normal((6, 5)), rng.standard_normal((6, 2)), rng.standard_normal((2, 5))
    bad = up.copy()
    bad[0, 0] = np.nan
    assert math.isnan(safelora.safelora_score(diff, bad, down, 1.0, diff_norm=1.0, xp=np).cosine)
    assert not math.isfinite(ediem.ediem_score(diff, bad, down, 1.0, diff_norm=1.0, xp=np).score)
    bad_diff = diff.copy()
    bad_diff[1, 1] = np.inf
    bad_norm = float(np.linalg.norm(bad_diff))
    assert math.isnan(safelora.safelora_score(bad_diff, up, down, 1.0, diff_norm=bad_norm, xp=np).cosine)
    assert math.isnan(ediem.ediem_score(bad_diff, up, down, 1.0, diff_norm=bad_norm, xp=np).score)
    bad_diff[1, 1] = np.nan
    assert math.isnan(safelora.safelora_score(bad_diff, up, down, 1.0, diff_norm=1.0, xp=np).cosine)
    assert math.isnan(ediem.ediem_score(bad_diff, up, down, 1.0, diff_norm=1.0, xp=np).score)


# ---------------------------------------------------------------------------------------
# E-DIEM against the dense reference


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(max_dim=120), st.integers(2, 12), st.integers(0, 2**31))
def test_ediem_matches_dense_reference(case, samples, seed):
    diff, up, down, scale = case
    a = float(np.linalg.norm(diff))
    got = ediem.ediem_score(diff, up, down, scale, diff_norm=a, samples=samples, seed=seed, xp=np)
    ref = ref_ediem(diff, up, down, scale, samples, seed)
    assert got.samples == samples
    scale_abs = abs(scale) * float(np.linalg.norm(up @ down)) + 1e-300  # ‖ΔW‖: the distances' scale
    assert close(got.distance, ref["distance"], rel=1e-8, abs_=1e-7 * scale_abs)
    assert close(got.mean, ref["mean"], rel=1e-8, abs_=1e-7 * scale_abs)
    spread = ref["std"] / (ref["mean"] + 1e-300)
    if not np.any(diff) or not np.any(up @ down) or up.shape[0] == 1:
        # nothing moves under a rotation: C = 0, ΔW = 0, or d = 1 (O(1) = {±1}, C a scalar)
        assert got.score == 0.0
        assert spread < 1e-9
    elif spread > 1e-11:
        # the dense reference's own rounding (~1e-16 of each distance) grows as the spread shrinks
        rel = 1e-5 + 1e-13 / spread
        assert close(got.std, ref["std"], rel=rel, abs_=1e-12 * scale_abs)
        assert close(got.score, ref["score"], rel=rel, abs_=rel), (got, ref)
    else:  # a spread at the edge of float64: the score must still be finite
        assert math.isfinite(got.score)
    # neither s nor the sign of ΔW changes the score
    flipped = ediem.ediem_score(diff, -up, down, 1.0, diff_norm=a, samples=samples, seed=seed, xp=np)
    assert close(flipped.score, got.score, rel=1e-7, abs_=1e-7)


def test_ediem_degenerate_conventions():
    rng = np.random.default_rng(5)
    d, k, r = 20, 15, 3
    diff, up, down = rng.standard_normal((d, k)), rng.standard_normal((d, r)), rng.standard_normal((r, k))
    a = float(np.linalg.norm(diff))
    zero = ediem.ediem_score(diff, np.zeros((d, r)), down, 2.0, diff_norm=a, xp=np)
    assert (zero.score, zero.distance, zero.mean, zero.std) == (0.0, 0.0, 0.0, 0.0)
    no_c = ediem.ediem_score(np.zeros((d, k)), up, down, -2.0, diff_norm=0.0, xp=np)
    norm = 2.0 * float(np.linalg.norm(up @ down))
    assert no_c.score == 0.0 and no_c.std == 0.0
    assert close(no_c.distance, norm, rel=1e-12) and no_c.distance == no_c.mean
    # C = c·I on R^d (A with d equal singular values, d ≤ k): every rotation gives the same distance
    iso = np.linalg.qr(rng.standard_normal((2 * d, d)))[0].T * 0.4
    z = ediem.ediem_score(iso, up, rng.standard_normal((r, 2 * d)), 1.0, diff_norm=float(np.linalg.norm(iso)),
                            xp=np)
    assert z.score == 0.0
    assert z.std <= 1e-12 * z.mean
    with pytest.raises(ValueError):
        ediem.ediem_score(diff, up, down, 1.0, diff_norm=a, samples=1, xp=np)


def test_ediem_reference_is_seeded_and_prefix_stable():
    rng = np.random.default_rng(6)
    diff, up, down = rng.standard_normal((30, 25)) * 0.1, rng.standard_normal((30, 4)), rng.standard_normal((4, 25))
    a = float(np.linalg.norm(diff))
    one = ediem.ediem_score(diff, up, down, 1.0, diff_norm=a, samples=16, seed=7, xp=np)
    assert one == ediem.ediem_score(diff, up, down, 1.0, diff_norm=a, samples=16, seed=7, xp=np)
    assert one != ediem.ediem_score(diff, up, down, 1.0, diff_norm=a, samples=16, seed=8, xp=np)
    probes = ediem.reference_probes(30, 4, 16, 7)
    assert probes.shape == (16, 30, 4)
    np.testing.assert_array_equal(ediem.reference_probes(30, 4, 40, 7)[:16], probes)


def test_ediem_is_calibrated_on_random_updates():
    """A randomly oriented update is a draw from E-DIEM's own reference: over many such
    modules the score is centred and of unit spread — unlike the public code's score,
    which is rounding noise divided by its 1e-6 guard."""
    rng = np.random.default_rng(7)
    d, k, r = 40, 30, 4
    diff = rng.standard_normal((d, 3)) @ rng.standard_normal((3, k))
    diff *= 0.8 / np.linalg.norm(diff)
    a = float(np.linalg.norm(diff))
    down = rng.standard_normal((r, k))
    scores = [ediem.ediem_score(diff, rng.standard_normal((d, r)), down, 1.0, diff_norm=a, samples=64,
                                  seed=0, xp=np).score for _ in range(150)]
    assert abs(np.mean(scores)) < 0.3, np.mean(scores)
    assert 0.7 < np.std(scores) < 1.4, np.std(scores)


def test_float32_alignment_difference_gives_the_float64_scores():
    """The passes over A run in A's dtype (no float64 copy of a float32 A)."""
    rng = np.random.default_rng(8)
    d, k, r = 90, 70, 6
    diff = rng.standard_normal((d, 2)) @ rng.standard_normal((2, k)) + 0.05 * rng.standard_normal((d, k))
    diff *= 0.7 / np.linalg.norm(diff)
    up, down = rng.standard_normal((d, r)), rng.standard_normal((r, k))
    up[:, :2] += 3 * np.linalg.svd(diff)[0][:, :2]  # partly inside
    a = float(np.linalg.norm(diff))
    d32 = diff.astype(np.float32)
    for_64 = safelora.safelora_score(diff, up, down, 2.0, diff_norm=a, xp=np)
    for_32 = safelora.safelora_score(d32, up, down, 2.0, diff_norm=a, xp=np)
    assert abs(for_32.cosine - for_64.cosine) < 1e-5
    e64 = ediem.ediem_score(diff, up, down, 2.0, diff_norm=a, xp=np)
    e32 = ediem.ediem_score(d32, up, down, 2.0, diff_norm=a, xp=np)
    assert abs(e32.score - e64.score) < 1e-3 * max(1.0, abs(e64.score)), (e32, e64)
    # and the float32 run equals the dense reference on the float32 A
    ref = ref_ediem(d32, up, down, 2.0, 32, 0)
    assert close(e32.score, ref["score"], rel=1e-3, abs_=1e-3)
    assert safelora.project_up(d32, up, diff_norm=a, xp=np).dtype == np.float64


# ---------------------------------------------------------------------------------------
# The array API path


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(max_dim=60), st.integers(2, 8))
def test_array_api_strict_gives_the_numpy_results(case, samples):
    diff, up, down, scale = case
    xs = array_api_strict
    a = float(np.linalg.norm(diff))
    sd, su, sdown = xs.asarray(diff), xs.asarray(up), xs.asarray(down)
    np_cos = safelora.safelora_score(diff, up, down, scale, diff_norm=a, xp=np)
    xs_cos = safelora.safelora_score(sd, su, sdown, scale, diff_norm=a, xp=xs)
    for field in ("cosine", "inner", "projected_norm", "delta_norm"):
        assert close(getattr(xs_cos, field), getattr(np_cos, field), rel=1e-12, abs_=1e-300), field
    xs_proj = safelora.project_up(sd, su, diff_norm=a, xp=xs)
    assert type(xs_proj).__module__.startswith("array_api_strict")
    np.testing.assert_allclose(np.asarray(xs_proj), safelora.project_up(diff, up, diff_norm=a, xp=np),
                               rtol=1e-12, atol=1e-300)
    np_e = ediem.ediem_score(diff, up, down, scale, diff_norm=a, samples=samples, seed=3, xp=np)
    xs_e = ediem.ediem_score(sd, su, sdown, scale, diff_norm=a, samples=samples, seed=3, xp=xs)
    for field in ("score", "distance", "mean", "std"):
        assert close(getattr(xs_e, field), getattr(np_e, field), rel=1e-9, abs_=1e-12), field
    d32 = xs.asarray(diff.astype(np.float32))
    assert close(ediem.ediem_score(d32, su, sdown, scale, diff_norm=a, samples=samples, xp=xs).distance,
                 ediem.ediem_score(diff.astype(np.float32), up, down, scale, diff_norm=a, samples=samples,
                                     xp=np).distance, rel=1e-9, abs_=1e-300)


# ---------------------------------------------------------------------------------------
# Selection: SafeLoRA's public lowest-k rule


# ---------------------------------------------------------------------------------------
# DDI ablation


def test_components_product_and_parsing():
    values = dict(sharpness=0.5, deviation=0.8, magnitude=0.01)
    assert ablation.components({"S", "O", "M"}, **values) == 0.5 * 0.8 * 0.01
    assert ablation.components(("S", "O"), **values) == 0.5 * 0.8
    assert ablation.components(["M"], **values) == 0.01
    assert ablation.components("OM", **values) == 0.8 * 0.01
    assert ablation.parse_components("S,O") == ("S", "O")
    assert ablation.parse_components("m, s") == ("S", "M")
    assert ablation.parse_components("O+S+M") == ("S", "O", "M")
    for bad in ("", "S,X", "S,S", ","):
        with pytest.raises(ValueError):
            ablation.parse_components(bad)
    for bad in (set(), {"S", "Q"}):
        with pytest.raises(ValueError):
            ablation.components(bad, **values)


def test_components_of_all_three_is_ddi():
    rng = np.random.default_rng(9)
    w0, up, down = rng.standard_normal((30, 20)), rng.standard_normal((30, 3)) * 0.1, rng.standard_normal((3, 20))
    spec = spectral.update_spectrum(up, down, 2.0, xp=np)
    s = spectral.sharpness(spec)
    o = spectral.deviation(spectral.exact_basis(w0, t=3, xp=np), up, spec, 2.0, xp=np)
    m = spectral.magnitude_norm(math.sqrt(spec.energy), float(np.linalg.norm(w0)))
    assert ablation.components(ablation.parse_components("S,O,M"), sharpness=s, deviation=o, magnitude=m) == s * o * m
    assert ablation.components(ablation.parse_components("S,O"), sharpness=s, deviation=o, magnitude=m) == s * o


# ---------------------------------------------------------------------------------------
# The planted case


def planted(seed=11, d=48, k=40, r=4, norm=0.5, scale=2.0):
    """Seven modules, each on its own block with its own unaligned weight W_u and a rank-2
    alignment update A (singular values 1 : 0.6, ‖A‖_F = ``norm``); W0 = W_a = W_u + A
    (the adapter is trained on the aligned model). Every ΔW = s·U·L has ‖ΔW‖_F = ``norm``.

    undo-a, undo-b   ΔW ≈ −A (plus a little noise): the update undoes the alignment
    reinforce        ΔW ≈ +A: the update strengthens it
    orth-a, orth-b   rank 4, flat spectrum, column space ⟂ A's
    random           rank 4, flat spectrum, randomly oriented
    orth-sharp       rank 1, ⟂ A's column space
    """
    rng = np.random.default_rng(seed)
    kinds = ["undo-a", "undo-b", "reinforce", "orth-a", "orth-b", "random", "orth-sharp"]
    modules = {}
    for name in kinds:
        unaligned = 0.1 * rng.standard_normal((d, k))
        left = np.linalg.qr(rng.standard_normal((d, d)))[0]
        right = np.linalg.qr(rng.standard_normal((k, 2)))[0]
        sig = np.array([1.0, 0.6]) * norm / math.sqrt(1.36)
        diff = (left[:, :2] * sig) @ right.T
        aligned = unaligned + diff
        outside = left[:, 2:]  # ⟂ A's column space
        if name in ("undo-a", "undo-b", "reinforce"):
            sign = -1.0 if name.startswith("undo") else 1.0
            up = np.c_[sign * left[:, :2] * sig, 0.01 * rng.standard_normal((d, r - 2))]
            down = np.r_[right.T, rng.standard_normal((r - 2, k)) / math.sqrt(k)]
        else:
            frame = np.linalg.qr(rng.standard_normal((k, r)))[0].T
            if name == "random":
                up = np.linalg.qr(rng.standard_normal((d, r)))[0]
            else:
                up = outside @ np.linalg.qr(rng.standard_normal((d - 2, r)))[0]
            down = frame
            if name == "orth-sharp":
                up[:, 1:] = 0.0
        up = up * norm / (abs(scale) * np.linalg.norm(up @ down))
        modules[name] = dict(w0=aligned, unaligned=unaligned, aligned=aligned, up=up, down=down)
    return modules, scale


def score_planted(modules, scale, **kw):
    rows = {}
    for name, m in modules.items():
        diff = m["aligned"] - m["unaligned"]  # as the scan computes it
        a = float(np.linalg.norm(diff))
        safe = safelora.safelora_score(diff, m["up"], m["down"], scale, diff_norm=a, xp=np)
        misaligned = ediem.ediem_score(diff, m["up"], m["down"], scale, diff_norm=a, xp=np, **kw)
        r = m["up"].shape[1]
        spec = spectral.update_spectrum(m["up"], m["down"], scale, xp=np)
        s = spectral.sharpness(spec)
        o = spectral.deviation(spectral.exact_basis(m["w0"], t=r, xp=np), m["up"], spec, scale, xp=np)
        mn = spectral.magnitude_norm(math.sqrt(spec.energy), float(np.linalg.norm(m["w0"])))
        rows[name] = dict(cosine=safe.cosine, ediem=misaligned.score, ddi=s * o * mn, S=s, O=o, M_norm=mn, sign_flip=(
            safelora.safelora_score(diff, -m["up"], m["down"], scale, diff_norm=a, xp=np).cosine,
            ediem.ediem_score(diff, -m["up"], m["down"], scale, diff_norm=a, xp=np, **kw).score))
        # the dense reference agrees on the planted modules too (where CΔW is not rounding noise)
        ref = ref_safelora(diff, m["up"], m["down"], scale)
        if ref["projected_norm"] > 1e-9 * ref["delta_norm"]:
            assert abs(safe.cosine - ref["cosine"]) < 1e-9
        else:
            assert safe.cosine < 1e-12
    return rows


def test_planted_alignment_each_methods_ranking():
    """What each method finds on a planted aligned/unaligned pair (the README's table).

    * SafeLoRA (lowest cosine first) picks the modules **orthogonal** to the alignment
      subspace (cos ≈ 0: orth-a, orth-b, orth-sharp), then the randomly oriented one.
      It ranks the modules that **undo** the alignment (ΔW ≈ −A) as the *most* aligned
      (cos ≈ 0.95, the same as the reinforcing module): the cosine is even in ΔW, so it
      cannot tell undoing from reinforcing. Its top-k equals the public lowest-k rule.
    * E-DIEM (highest first) agrees with SafeLoRA here (C's eigenvalues are below 1):
      orthogonal modules are at the far end of their rotation reference (d(CΔW, ΔW) =
      ‖ΔW‖, the largest distance possible), in-subspace ones far below it (strongly
      negative), the random one in between, near 0. Same blind spot: even in ΔW.
    * DDI never sees the aligned/unaligned pair. It ranks by sharpness here (equal M_norm,
      similar O): the rank-1 orth-sharp first, then the rank-2 undo-a, undo-b — and
      reinforce, identically — then the flat rank-4 ones. It "finds" the undoing modules
      only because an alignment update is low-rank; it flags a reinforcing or an
      orthogonal sharp update just as much.
    """
    modules, scale = planted()
    rows = score_planted(modules, scale)
    undo, within = {"undo-a", "undo-b"}, {"undo-a", "undo-b", "reinforce"}
    orth = {"orth-a", "orth-b", "orth-sharp"}

    cos = {n: r["cosine"] for n, r in rows.items()}
    safelora = ranked(cos, "safelora")
    assert set(safelora[:3]) == orth and safelora[3] == "random" and set(safelora[4:]) == within
    assert all(cos[n] < 1e-12 for n in orth)
    assert all(0.9 < cos[n] <= 1.0 for n in within)
    assert 0.01 < cos["random"] < 0.6
    names = list(cos)
    ordered = sorted(cos.values())
    for k in range(1, len(names) + 1):  # the public code's lowest-k rule ...
        ours = set(ranked(cos, "safelora", k))
        public = {names[i] for i in public_lowest_k(np.array([cos[n] for n in names]), k)}
        assert len(ours) == k and ours <= public
        if k == len(names) or ordered[k - 1] < ordered[k]:  # ... equal unless tied at the cut
            assert ours == public
    # the three orthogonal modules tie at exactly 0: the public rule takes all three for k = 1
    assert len(public_lowest_k(np.array(list(cos.values())), 1)) == 3

    ediem = {n: r["ediem"] for n, r in rows.items()}
    splora = ranked(ediem, "splora")
    assert set(splora[:3]) == orth and set(splora[-3:]) == within
    assert all(ediem[n] > 0.5 for n in orth)  # a planted misaligned module stands out ...
    assert all(ediem[n] < -10.0 for n in within)  # ... from the aligned ones
    assert abs(ediem["random"]) < 3.0

    ddi = {n: r["ddi"] for n, r in rows.items()}
    by_ddi = ranked(ddi, "ddi")
    assert by_ddi[0] == "orth-sharp" and set(by_ddi[1:4]) == within
    assert {n for n in by_ddi[:3]} >= {"orth-sharp"} and undo <= set(by_ddi[:4])
    spread = [rows[n]["M_norm"] for n in rows]
    assert max(spread) - min(spread) < 0.06 * max(spread)  # equal ‖ΔW‖; ‖W0‖ varies a little

    # none of the three can tell undoing from reinforcing: every score is even in ΔW
    for n, r in rows.items():
        assert abs(r["sign_flip"][0] - r["cosine"]) < 1e-12
        assert abs(r["sign_flip"][1] - r["ediem"]) < 1e-7 * max(1.0, abs(r["ediem"]))


def test_planted_rewrite_projection_keeps_undoing_modules():
    """SafeLoRA's rewrite lora_B ← C·lora_B zeroes an orthogonal module and leaves an undoing
    one pointing the same way (cos(CΔW, ΔW) ≈ 0.95): the projection cannot repair it."""
    modules, scale = planted()
    for name, keeps in (("orth-a", False), ("undo-a", True)):
        m = modules[name]
        diff = m["aligned"] - m["unaligned"]
        a = float(np.linalg.norm(diff))
        new_up = safelora.project_up(diff, m["up"], diff_norm=a, xp=np)
        before = scale * m["up"] @ m["down"]
        after = scale * new_up @ m["down"]
        np.testing.assert_allclose(after, dense_alignment(diff) @ before, atol=1e-12)
        ratio = np.linalg.norm(after) / np.linalg.norm(before)
        if keeps:
            assert np.sum(after * before) / (np.linalg.norm(after) * np.linalg.norm(before)) > 0.9
            assert ratio > 0.2
        else:
            assert ratio < 1e-12


def test_ediem_direction_flips_when_c_is_long():
    """C is not a projector: with σ₁(A)²/‖A‖_F = 5 an update inside A's column space is moved
    to |5 − 1|·‖ΔW‖ from itself, farther than a randomly oriented update, so E-DIEM ranks it
    *misaligned* — while SafeLoRA's cosine (free of A's scale) still calls it aligned."""
    rng = np.random.default_rng(12)
    d, k, r = 40, 30, 3
    col, row = rng.standard_normal(d), rng.standard_normal(k)
    diff = 5.0 * np.outer(col / np.linalg.norm(col), row / np.linalg.norm(row))  # λ = 5
    a = float(np.linalg.norm(diff))
    down = rng.standard_normal((r, k))
    inside = np.outer(col, rng.standard_normal(r))
    outside = rng.standard_normal((d, r))
    outside -= np.outer(col, col @ outside) / (col @ col)
    e_in = ediem.ediem_score(diff, inside, down, 1.0, diff_norm=a, xp=np)
    e_out = ediem.ediem_score(diff, outside, down, 1.0, diff_norm=a, xp=np)
    assert e_in.score > 5.0 and e_in.score > e_out.score
    assert close(e_in.distance, 4.0 * float(np.linalg.norm(inside @ down)), rel=1e-9)
    c_in = safelora.safelora_score(diff, inside, down, 1.0, diff_norm=a, xp=np).cosine
    c_out = safelora.safelora_score(diff, outside, down, 1.0, diff_norm=a, xp=np).cosine
    assert c_in > 1 - 1e-12 and c_out < 1e-12
    # a short C (λ = 0.5) restores the order
    short = diff / 10.0
    e_in_short = ediem.ediem_score(short, inside, down, 1.0, diff_norm=a / 10.0, xp=np)
    e_out_short = ediem.ediem_score(short, outside, down, 1.0, diff_norm=a / 10.0, xp=np)
    assert e_in_short.score < 0 < e_out_short.score
