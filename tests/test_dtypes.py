"""ddiscan.io.dtypes against ml_dtypes: every stored code decodes, and float32 values encode,
exactly as ml_dtypes converts them."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ddiscan.io import dtypes
from ddiscan.io.convert import widen

FORMATS = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def same_values(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(a[~np.isnan(a)], b[~np.isnan(b)]) \
        and np.array_equal(np.signbit(a[~np.isnan(a)]), np.signbit(b[~np.isnan(b)]))


@pytest.mark.parametrize("encoding", sorted(FORMATS))
@pytest.mark.parametrize("out", [np.float32, np.float64])
def test_every_code_decodes_as_ml_dtypes_reads_it(encoding, out):
    storage = dtypes.STORAGE[encoding]
    bits = np.arange(np.iinfo(storage).max + 1, dtype=np.int64).astype(storage)
    expected = bits.view(FORMATS[encoding]).astype(out)
    got = dtypes.decode(bits, encoding, out=np.empty(bits.shape, out))
    assert got.dtype == out and same_values(got, expected)


@pytest.mark.parametrize("encoding", ["F8_E4M3", "F8_E5M2"])
@pytest.mark.parametrize("out", [np.float32, np.float64])
def test_float8_pairs_of_codes_decode_in_any_layout(encoding, out):
    # two codes a lookup: every pair of codes, an odd count, an odd (unaligned) start, a strided view
    pairs = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)
    for bits in (pairs, pairs[:-1], np.concatenate([np.zeros(1, np.uint8), pairs])[1:], pairs[::3],
                 pairs.reshape(256, 512)[:, :5]):
        got = dtypes.decode(bits, encoding, out=np.empty(bits.shape, out))
        assert same_values(got, bits.view(FORMATS[encoding]).astype(out) if bits.flags.c_contiguous
                           else np.ascontiguousarray(bits).view(FORMATS[encoding]).astype(out))


def interesting_floats(encoding):
    """Every code's value, the midpoints between neighbours (the ties), just off them, and
    values past the largest finite one."""
    values = dtypes.decode(np.arange(np.iinfo(dtypes.STORAGE[encoding]).max + 1).astype(dtypes.STORAGE[encoding]),
                           encoding).astype(np.float64)
    finite = np.unique(values[np.isfinite(values)])
    mid = (finite[:-1] + finite[1:]) / 2
    top = finite[-1] * np.array([1.01, 1.03, 1.05, 1.07, 1.1, 2.0, 1e3])
    grid = np.concatenate([finite, mid, np.nextafter(mid, np.inf), np.nextafter(mid, -np.inf), top, -top,
                           [np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-30, -1e-30]])
    return grid.astype(np.float32)


@pytest.mark.parametrize("encoding", sorted(FORMATS))
def test_encoding_rounds_as_ml_dtypes_does(encoding):
    values = interesting_floats(encoding)
    expected = values.astype(FORMATS[encoding]).astype(np.float64)
    got = dtypes.decode(dtypes.encode(values, encoding), encoding)
    assert same_values(got, expected)


@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=64),
       st.sampled_from(sorted(FORMATS)))
def test_encoding_random_floats_matches_ml_dtypes(values, encoding):
    values = np.array(values, np.float32)
    assert same_values(dtypes.decode(dtypes.encode(values, encoding), encoding),
                       values.astype(FORMATS[encoding]).astype(np.float64))


@pytest.mark.parametrize("encoding", sorted(FORMATS))
def test_widen_reads_stored_bits_and_ml_dtypes_arrays_alike(encoding):
    rng = np.random.default_rng(1)
    values = rng.standard_normal((70, 1100)).astype(FORMATS[encoding])  # more than one block
    bits = values.view(dtypes.STORAGE[encoding])
    expected = values.astype(np.float64)
    for dtype in (np.float32, np.float64):
        from_bits, norm_bits = widen(bits, dtype, encoding=encoding)
        from_ml, norm_ml = widen(values, dtype)
        assert same_values(from_bits, expected) and same_values(from_ml, expected)
        assert norm_bits == norm_ml
        assert abs(norm_bits - np.linalg.norm(expected)) <= 1e-6 * np.linalg.norm(expected)
