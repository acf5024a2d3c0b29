"""Widening a mapped tensor to the working dtype in one pass, with its Frobenius norm.

Reading a base tensor is the scan's floor; converting it must not add passes. The tensor
is widened block by block into one preallocated array, and each block's sum of squares
is taken while the block is still in cache, so the bytes are read once and ‖W0‖_F costs
no extra pass. bfloat16 and float8 arrive as their stored bits and are widened exactly
(ddiscan/io/dtypes.py: a 16-bit shift, or a 256-entry table), in a single ufunc pass.
"""

from __future__ import annotations

import math

import numpy as np

from . import dtypes

__all__ = ["widen", "widen_into", "widen_block", "stored_encoding", "frobenius"]

# Elements per block: 256 KiB of float32, small enough to stay in L2.
BLOCK = 1 << 16


def widen(array: np.ndarray, dtype=np.float32, *, encoding: str | None = None) -> tuple[np.ndarray, float]:
    """Copy ``array`` (e.g. a memory map) into ``dtype``; return it and ‖array‖_F.

    Parameters
    ----------
    array : ndarray
        C-contiguous: a NumPy float array, an ml_dtypes bfloat16/float8 array, or the
        stored bits of one (uint16/uint8) with ``encoding`` naming the format.
    dtype : numpy dtype, default float32
        float32 or float64.
    encoding : str, optional
        The safetensors dtype of the tensor ``array`` maps: for "BF16", "F8_E4M3" and
        "F8_E5M2" it holds their stored bits; any other dtype is read as it is.

    Returns
    -------
    widened : ndarray, same shape, ``dtype``
    norm : float
        The Frobenius norm: each block's sum of squares by BLAS ``dot`` in ``dtype``, the
        blocks' sums in float64 (relative error about 1e-7 in float32, measured; exact
        to float64 rounding with ``dtype=float64``); NaN or Inf when the tensor holds one.
    """
    flat = np.ascontiguousarray(array).reshape(-1)
    out = np.empty(flat.shape, np.dtype(dtype))
    total = widen_into(flat, out, encoding=stored_encoding(flat, encoding))
    return out.reshape(array.shape), math.sqrt(total)


def stored_encoding(array: np.ndarray, encoding: str | None) -> str | None:
    """The encoding :func:`widen_into` decodes ``array`` by: ``encoding`` where it names one
    of bfloat16/float8's stored bits, an ml_dtypes array's own, else None (a NumPy float)."""
    return encoding if encoding in dtypes.ENCODED else dtypes.encoding_of(array)


def widen_into(flat: np.ndarray, out: np.ndarray, *, encoding: str | None) -> float:
    """Widen the 1-D ``flat`` into ``out`` (same size, float32 or float64) block by block;
    return Σ x², each block's by :func:`_sum_of_squares` while it is in cache, float64
    across blocks (the precision :func:`widen` states). ``encoding`` as
    :func:`stored_encoding` gives it."""
    total = 0.0
    for start in range(0, flat.size, BLOCK):
        stop = min(start + BLOCK, flat.size)
        block = out[start:stop]
        widen_block(flat[start:stop], block, encoding=encoding)
        total += _sum_of_squares(block)
    return total


def widen_block(flat: np.ndarray, out: np.ndarray, *, encoding: str | None) -> None:
    """Widen ``flat`` into ``out`` (same shape; either may be strided) in one ufunc pass:
    bfloat16/float8 bits decoded exactly (:func:`ddiscan.io.dtypes.decode`), a NumPy float
    array cast."""
    if encoding:
        dtypes.decode(flat, encoding, out=out)
    else:
        out[...] = flat


def _sum_of_squares(block: np.ndarray) -> float:
    """Σ x² of one block by BLAS ``dot``; where float32 squares overflow a finite block
    (values near 3.4e38), again in float64, which holds them: Inf only for an Inf or NaN
    value, and no numpy warning either way."""
    with np.errstate(over="ignore", invalid="ignore"):
        total = float(np.dot(block, block))
    if math.isinf(total) and block.dtype != np.float64 and bool(np.isfinite(block).all()):
        wide = block.astype(np.float64)
        total = float(np.dot(wide, wide))
    return total


def frobenius(array: np.ndarray) -> float:
    """‖array‖_F of a float32/float64 array: BLAS ``dot`` per block, float64 across blocks."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return math.sqrt(sum(float(np.dot(flat[i:i + BLOCK], flat[i:i + BLOCK])) for i in range(0, flat.size, BLOCK)))
