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

__all__ = ["widen", "frobenius"]

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
    dtype = np.dtype(dtype)
    flat = np.ascontiguousarray(array).reshape(-1)
    encoding = encoding if encoding in dtypes.ENCODED else dtypes.encoding_of(flat)
    out = np.empty(flat.shape, dtype)
    total = 0.0
    for start in range(0, flat.size, BLOCK):
        stop = min(start + BLOCK, flat.size)
        block = out[start:stop]
        if encoding:
            dtypes.decode(flat[start:stop], encoding, out=block)
        else:
            block[...] = flat[start:stop]
        total += _sum_of_squares(block)
    return out.reshape(array.shape), math.sqrt(total)


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
