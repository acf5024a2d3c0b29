"""bfloat16 and float8 in plain NumPy: stored bits → float32, and float32 → stored bits.

NumPy has neither format. ml_dtypes adds them, but importing its extension costs more
than a whole scan of a small adapter (0.6 s for ml_dtypes 0.7 on the machines we measure),
and a scan only needs to widen them. Both are simple:

* **bfloat16** is the high half of a float32 (same sign and exponent, 7 of its 23 mantissa
  bits): widening is a 16-bit shift, exact; narrowing rounds to nearest, ties to even.
* **float8** (``F8_E4M3``: OCP e4m3fn, bias 7, no infinities, NaN = S.1111.111, largest
  448; ``F8_E5M2``: IEEE-style, bias 15, infinities and NaNs) has 256 values: widening is
  a table lookup; narrowing picks the nearest table value, ties to the even code, and
  overflows as the format does (e4m3fn to NaN, e5m2 to infinity).

tests/test_dtypes.py checks every code and a dense set of float32 values against ml_dtypes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ENCODED", "STORAGE", "encoding_of", "decode", "encode"]

# safetensors dtype → the unsigned integer type its bits are mapped as
STORAGE = {"BF16": np.dtype(np.uint16), "F8_E4M3": np.dtype(np.uint8), "F8_E5M2": np.dtype(np.uint8)}
ENCODED = frozenset(STORAGE)
# ml_dtypes' names for the same formats (arrays a caller made with ml_dtypes)
_NAMES = {"bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
# (exponent bits, mantissa bits, bias, has infinities) of each float8 format
_FLOAT8 = {"F8_E4M3": (4, 3, 7, False), "F8_E5M2": (5, 2, 15, True)}


def _float8_table(code: str) -> np.ndarray:
    """The 256 values of a float8 format, indexed by their bits, as float64."""
    exp_bits, man_bits, bias, ieee = _FLOAT8[code]
    bits = np.arange(256)
    exponent = (bits >> man_bits) & ((1 << exp_bits) - 1)
    mantissa = (bits & ((1 << man_bits) - 1)) / (1 << man_bits)
    magnitude = np.where(exponent == 0, mantissa * 2.0 ** (1 - bias), (1 + mantissa) * 2.0 ** (exponent - bias))
    top = exponent == (1 << exp_bits) - 1
    if ieee:  # e5m2: the top exponent holds infinities (mantissa 0) and NaNs
        magnitude = np.where(top, np.where(mantissa == 0, np.inf, np.nan), magnitude)
    else:  # e4m3fn: only S.1111.111 is NaN; the rest of the top exponent is finite
        magnitude = np.where(top & (mantissa == 1 - 1 / (1 << man_bits)), np.nan, magnitude)
    return np.where(bits >> 7, -magnitude, magnitude)


_TABLES = {code: _float8_table(code) for code in _FLOAT8}


def encoding_of(array: np.ndarray) -> str | None:
    """The safetensors dtype of an ml_dtypes bfloat16/float8 array, else None."""
    return _NAMES.get(array.dtype.name)


def decode(bits: np.ndarray, encoding: str, *, out: np.ndarray | None = None) -> np.ndarray:
    """Values of the stored ``bits`` (uint16 for BF16, uint8 for float8) as float32 (or
    into ``out``, float32 or float64, same shape). Exact: every value is a float32."""
    bits = bits.view(STORAGE[encoding]) if bits.dtype != STORAGE[encoding] else bits
    if out is None:
        out = np.empty(bits.shape, np.float32)
    if encoding == "BF16":
        if out.dtype == np.float32:
            np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
        else:
            with np.errstate(invalid="ignore"):  # a signalling NaN stays a NaN, silently
                out[...] = np.left_shift(bits, 16, dtype=np.uint32).view(np.float32)
    else:
        _decode_float8(bits, encoding, out)
    return out


_PAIRS: dict = {}


def _pair_table(encoding: str, dtype) -> np.ndarray:
    """The values of every two consecutive float8 codes read as one uint16 (in this
    machine's byte order): 65536 × 2, so one lookup decodes two bytes."""
    key = (encoding, np.dtype(dtype))
    if key not in _PAIRS:
        pairs = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
        _PAIRS[key] = _TABLES[encoding].astype(dtype)[pairs]
    return _PAIRS[key]


def _decode_float8(bits: np.ndarray, encoding: str, out: np.ndarray) -> None:
    """Table lookups (``mode="clip"``: every uint8 is in range, and numpy then writes into
    ``out`` unbuffered), two codes at a time where both arrays are contiguous."""
    table = _TABLES[encoding].astype(out.dtype)
    if not (bits.flags.c_contiguous and out.flags.c_contiguous):
        np.take(table, bits, out=out, mode="clip")
        return
    flat, values = bits.reshape(-1), out.reshape(-1)
    even = flat.size - flat.size % 2
    if even:
        np.take(_pair_table(encoding, out.dtype), flat[:even].view(np.uint16), axis=0, mode="clip",
                out=values[:even].reshape(-1, 2))
    np.take(table, flat[even:], out=values[even:], mode="clip")


def encode(values, encoding: str) -> np.ndarray:
    """``values`` rounded to the nearest value of the format (ties to even), as its stored bits."""
    values = np.asarray(values, dtype=np.float32)
    if encoding == "BF16":
        bits = values.view(np.uint32)
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        nan = np.isnan(values)
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # stays a (quiet) NaN
        return rounded
    return _encode_float8(values.astype(np.float64), encoding)


def _encode_float8(values: np.ndarray, encoding: str) -> np.ndarray:
    table = _TABLES[encoding][:128]  # the non-negative codes, in increasing order
    finite = table[np.isfinite(table)]
    magnitude = np.abs(values)
    # the nearest finite magnitude below (i) and above (i + 1)
    i = np.clip(np.searchsorted(finite, magnitude, side="right") - 1, 0, finite.size - 1)
    below, above = finite[i], finite[np.minimum(i + 1, finite.size - 1)]
    up = (magnitude - below > above - magnitude) | ((magnitude - below == above - magnitude) & (i % 2 == 1))
    code = np.where(up & (i + 1 < finite.size), i + 1, i)
    # past the largest finite value: the tie with the value the format would have next goes
    # to the even code (e5m2: infinity, 0x7C; e4m3fn: its largest, 0x7E, as 0x7F is NaN)
    ieee = _FLOAT8[encoding][3]
    halfway = finite[-1] + (finite[-1] - finite[-2]) / 2
    overflow = magnitude >= halfway if ieee else magnitude > halfway
    code = np.where(overflow, 0x7C if ieee else 0x7F, code)
    code = np.where(np.isnan(values), 0x7E if ieee else 0x7F, code)
    sign = np.signbit(values).astype(np.int64) << 7
    return (code | sign).astype(np.uint8)
