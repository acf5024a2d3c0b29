"""ddiscan.panels: a stored tensor as a float32 linear operator, widened a panel of rows at a time.

Every product, transpose, division, peak and norm is checked against the dense float32
matrix that ddiscan.io.convert.widen makes (the path it replaces) and against float64; the
kernels and the scan (with CheckpointSource.load patched to return it) against the
whole-copy path on PEFT-built checkpoints.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig

import ddiscan
from ddiscan import krylov
from ddiscan.io import dtypes
from ddiscan.io.convert import widen
from ddiscan.lora import orient
from ddiscan.panels import Panels
from ddiscan.sources import CheckpointSource
from test_real_peft import save_pair, tiny_gpt2, tiny_llama

ENCODINGS = ("BF16", "F16", "F8_E4M3", "F8_E5M2", "F32")


def stored(values: np.ndarray, encoding: str) -> np.ndarray:
    """``values`` as a checkpoint maps them: bfloat16/float8 as their bits, float16/32 as floats."""
    if encoding in dtypes.ENCODED:
        return dtypes.encode(values, encoding)
    return values.astype({"F16": np.float16, "F32": np.float32}[encoding])


@st.composite
def tensors(draw, *, special: bool = False):
    """(stored tensor, encoding, rows per panel): shapes from 1 × 1, panels from one row to
    more than all of them; with ``special``, one NaN, +Inf or −Inf somewhere."""
    rows, cols = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    encoding = draw(st.sampled_from(ENCODINGS))
    seed = draw(st.integers(0, 2**16))
    values = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    if special:
        i, j = draw(st.integers(0, rows - 1)), draw(st.integers(0, cols - 1))
        values[i, j] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        if encoding == "F8_E4M3" and np.isinf(values[i, j]):  # e4m3fn has no infinity: it overflows to NaN
            values[i, j] = np.nan
    panel_rows = draw(st.integers(1, rows + 2))
    return stored(values, encoding), encoding, panel_rows


def operator(array, encoding, panel_rows):
    return Panels.read(array, encoding=encoding, panel_bytes=panel_rows * 4 * array.shape[1])


def dense32(array, encoding):
    return widen(array, np.float32, encoding=encoding)


def close(actual, expected, *, rtol=2e-6):
    """Within float32 rounding of a sum of products, relative to the operands' scale."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(1.0, float(np.abs(expected).max())))


@settings(derandomize=True, max_examples=150, deadline=None)
@given(tensors(), st.integers(1, 5))
def test_products_transposes_and_division_match_the_dense_matrix(drawn, width):
    array, encoding, panel_rows = drawn
    a, norm = operator(array, encoding, panel_rows)
    w, widened_norm = dense32(array, encoding)
    rows, cols = w.shape
    rng = np.random.default_rng(width)
    x, y = rng.standard_normal((cols, width), np.float32), rng.standard_normal((rows, width), np.float32)
    assert a.shape == (rows, cols) and a.mT.shape == a.T.shape == (cols, rows) and a.dtype == np.float32
    assert a._stored.step == (min(panel_rows, rows), max(1, min(cols, panel_rows * cols // rows)))
    for got, want, exact in ((a @ x, w @ x, w.astype(np.float64) @ x), (a.mT @ y, w.T @ y, w.T.astype(np.float64) @ y),
                             (a.mT.mT @ x, w @ x, w.astype(np.float64) @ x)):
        assert got.dtype == np.float32
        close(got, want)
        close(got, exact, rtol=1e-5)
    c = np.float32(3.0)
    close((a / c) @ x, (w / c) @ x)
    close((a / c).mT @ y, (w / c).T @ y)
    close(a @ x[:, 0], w @ x[:, 0])  # a vector
    assert (a @ x.astype(np.float64)).dtype == np.float64
    np.testing.assert_array_equal(a.dense(), w)
    np.testing.assert_array_equal(a.mT.dense(), w.T)
    np.testing.assert_array_equal(np.asarray(a / c), w / c)
    assert a.peak() == np.max(np.abs(w)) and (a / c).peak() == np.max(np.abs(w / c))
    assert norm == pytest.approx(widened_norm, rel=1e-6)
    assert norm == pytest.approx(float(np.linalg.norm(w.astype(np.float64))), rel=1e-6)


@settings(derandomize=True, max_examples=100, deadline=None)
@given(tensors(special=True))
def test_nan_and_inf_give_the_norm_widen_gives(drawn):
    array, encoding, panel_rows = drawn
    a, norm = operator(array, encoding, panel_rows)
    _, widened_norm = dense32(array, encoding)
    assert not math.isfinite(norm)
    assert math.isnan(norm) == math.isnan(widened_norm) and math.isinf(norm) == math.isinf(widened_norm)
    assert np.isnan(a.peak()) == np.isnan(np.max(np.abs(a.dense())))


def test_panel_buffer_is_one_reused_block():
    """One float32 buffer of ``panel_bytes`` (or one row or column where that is larger),
    shared by the transposed and divided operators, holds a panel of rows or of columns."""
    array = stored(np.ones((1000, 64), np.float32), "BF16")
    a, _ = Panels.read(array, encoding="BF16", panel_bytes=64 * 4 * 10)
    assert a._stored.step == (10, 1) and a._stored.buffer.shape == (1000,)
    assert (a.mT / 2.0)._stored.buffer is a._stored.buffer
    wide, _ = Panels.read(array, encoding="BF16", panel_bytes=1000 * 4 * 8)
    assert wide._stored.step == (125, 8) and wide._stored.buffer.nbytes == 1000 * 4 * 8
    one, _ = Panels.read(array, encoding="BF16", panel_bytes=1)
    assert one._stored.step == (1, 1)
    default, _ = Panels.read(array, encoding="BF16")
    assert default._stored.buffer.nbytes <= ddiscan.panels.PANEL_BYTES


def test_ml_dtypes_arrays_and_higher_dimensions():
    """An ml_dtypes bfloat16 array reads as its own encoding; a convolution kernel as its
    (out, in · kh · kw) matrix, the one orient() makes of the dense tensor."""
    values = np.random.default_rng(0).standard_normal((6, 3, 2, 2)).astype(np.float32)
    kernel = values.astype(ml_dtypes.bfloat16)
    a, norm = Panels.read(kernel)
    w, widened_norm = widen(kernel, np.float32)
    module = SimpleNamespace(transpose_base=False)  # all orient() reads of a module
    assert orient(module, a) is a and a.shape == (6, 12)
    np.testing.assert_array_equal(a.dense(), orient(module, w))
    assert norm == pytest.approx(widened_norm, rel=1e-6)
    assert orient(SimpleNamespace(transpose_base=True), a).shape == (12, 6)


def test_numpy_functions_other_than_the_transpose_are_refused():
    a, _ = Panels.read(np.ones((3, 4), np.float32))
    assert np.linalg.matrix_transpose(a).shape == (4, 3) and np.matrix_transpose(a).shape == (4, 3)
    with pytest.raises(TypeError):
        np.max(a)
    with pytest.raises(ValueError, match="do not align"):
        a @ np.ones((3, 2), np.float32)


@pytest.fixture
def no_dense(monkeypatch):
    """Fail if anything widens an operator whole."""
    def refuse(self):
        raise AssertionError("the operator was widened whole")
    monkeypatch.setattr(Panels, "dense", refuse)


@pytest.mark.parametrize("kernel", ["krylov", "subspace"])
def test_kernels_take_the_operator_without_widening_it(kernel, no_dense):
    rng = np.random.default_rng(1)
    values = (rng.standard_normal((96, 40)) * np.geomspace(10, 0.1, 40)).astype(np.float32)
    array = stored(values, "BF16")
    a, _ = Panels.read(array, encoding="BF16", panel_bytes=7 * 4 * 40)
    w, _ = widen(array, np.float32, encoding="BF16")
    for w0 in (a, a.mT):
        args = dict(t=4, xp=np, right=True)
        run = (lambda m, o: krylov.block_krylov(m, o, iters=3, **args)) if kernel == "krylov" else (
            lambda m, o: krylov.subspace_iteration(m, o, power_iters=3, **args))
        dense_w = w if w0 is a else w.T
        # block Krylov's Ω has max(d, k) rows (it iterates on the smaller side), subspace iteration's k
        o = rng.standard_normal((96 if kernel == "krylov" else w0.shape[1], 12)).astype(np.float32)
        got, want = run(w0, o), run(dense_w, o)
        np.testing.assert_allclose(got.values, want.values, rtol=1e-5)
        close(np.abs(got.left.T @ want.left), np.eye(4), rtol=1e-4)
        assert got.residual == pytest.approx(want.residual, rel=1e-2, abs=1e-5 * want.values[0] ** 2)


def test_kernels_rescale_an_overflowing_operator():
    """bfloat16 reaches 3.4e38: the kernel's product overflows, and W0 / max|W0| is used."""
    rng = np.random.default_rng(2)
    values = rng.standard_normal((32, 20)).astype(np.float32)
    array = stored(values / np.abs(values).max() * 3.3e38, "BF16")
    a, norm = Panels.read(array, encoding="BF16", panel_bytes=5 * 4 * 20)
    w, _ = widen(array, np.float32, encoding="BF16")
    omega = rng.standard_normal((32, 8)).astype(np.float32)
    got, want = (krylov.block_krylov(m, omega, t=3, iters=2, xp=np) for m in (a, w))
    np.testing.assert_allclose(got.values, want.values, rtol=1e-5)
    assert math.isfinite(norm)


def _panel_load(self, key, fetched):
    """CheckpointSource.load with W0 as the operator (benchmarks/WIDENING.md measured the
    whole copy faster, so it is not the default)."""
    return Panels.read(fetched, encoding=self.index.info(key).dtype)


def _scores(report):
    fields = ("ddi", "sharpness", "deviation", "magnitude_norm", "base_norm", "deviation_error")
    return {m.name: [getattr(m, f) for f in fields] for m in report.modules}


@pytest.mark.parametrize("build", ["llama-bf16", "llama-f32", "gpt2-conv1d"])
def test_scan_with_the_operator_equals_the_whole_copy(tmp_path, monkeypatch, build, no_dense):
    if build == "gpt2-conv1d":
        model, targets = tiny_gpt2(seed=3), ["c_attn", "c_proj", "c_fc"]
    else:
        model, targets = tiny_llama(seed=4), ["q_proj", "v_proj", "up_proj", "down_proj"]
        model = model.to(torch.bfloat16 if build == "llama-bf16" else torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
    base_dir, adapter_dir, _ = save_pair(tmp_path, model, config)
    for options in ({}, {"sketch": "subspace"}, {"t": 2, "oversample": 2}):
        whole = ddiscan.scan(base_dir, adapter_dir, **options)
        with monkeypatch.context() as patch:
            patch.setattr(CheckpointSource, "load", _panel_load)
            panels = ddiscan.scan(base_dir, adapter_dir, **options)
        got, want = _scores(panels), _scores(whole)
        assert got.keys() == want.keys() and len(got) == len(panels.modules) > 0
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)
