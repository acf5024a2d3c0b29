"""W0 as a linear operator over its stored bytes: every product widens one panel at a time.

A base weight is stored as bfloat16, float16 or float8 (or float32); the kernels multiply
W0 by thin blocks 11 times (:mod:`ddiscan.krylov`). Widening it whole first makes a float32
copy (64 MiB for a 2048 × 8192 weight) that every product then reads at 4 bytes an
element. :class:`Panels` instead widens a panel of rows (of columns, for W0ᵀ Y) into one
reused float32 buffer small enough to stay in cache, multiplies it, and moves on: each
product reads the stored bytes (2 for bfloat16) and the copy is never whole. benchmarks/WIDENING.md measures both
ways on the real scan: the panels save the copy's memory (58 MiB of 261 at rank 64 on the
1B shape) but take 1.3–1.8× the time where the float32 copy fits in cache, so the scan
keeps the whole copy (:class:`~ddiscan.sources.CheckpointSource`) and this operator is for
when memory, not time, is what counts.

The operator offers what the kernels use of the float32 matrix: ``shape``, ``dtype``,
``ndim``, ``A @ X``, ``A.mT`` (and ``A.T``), ``A / c`` and :meth:`Panels.peak`; the dense
matrix, for whatever needs it (an exact SVD, another array namespace, NumPy ufuncs), is
:meth:`Panels.dense`, which ``numpy.asarray`` calls too. Pure array code: nothing is read
but the mapped bytes.
"""

from __future__ import annotations

import math

import numpy as np

from .io.convert import stored_encoding, widen, widen_block, widen_into

__all__ = ["Panels", "PANEL_BYTES"]

# The float32 buffer of one panel (a panel is at least one row or column): 1, 4 and 16 MiB
# made the products within 4 % of each other (benchmarks/WIDENING.md).
PANEL_BYTES = 4 << 20


class _Stored:
    """The mapped d × k tensor, how to widen it, and the one float32 buffer its panels share."""

    def __init__(self, array: np.ndarray, encoding: str | None, panel_bytes: int):
        self.array = np.ascontiguousarray(array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1))
        self.encoding = stored_encoding(self.array, encoding)
        rows, cols = self.array.shape
        elements = panel_bytes // 4
        # rows per row panel, columns per column panel: each fills the buffer, at least one
        self.step = (max(1, min(rows, elements // max(1, cols))), max(1, min(cols, elements // max(1, rows))))
        self.buffer = np.empty(max(self.step[0] * cols, rows * self.step[1]), np.float32)

    def panels(self, divisor, axis: int = 0):
        """Yield ``(start, stop, panel)``: rows (``axis`` 0) or columns (1) start:stop widened
        into the buffer, then divided by ``divisor`` when it is not None."""
        size, step = self.array.shape[axis], self.step[axis]
        for start in range(0, size, step):
            stop = min(start + step, size)
            stored = self.array[start:stop] if axis == 0 else self.array[:, start:stop]
            panel = self.buffer[: stored.size].reshape(stored.shape)
            widen_block(stored, panel, encoding=self.encoding)
            if divisor is not None:
                np.divide(panel, divisor, out=panel)
            yield start, stop, panel

    def sum_of_squares(self) -> float:
        """Σ x² of the tensor, a row panel at a time, as :func:`~ddiscan.io.convert.widen` takes it."""
        total, rows = 0.0, self.array.shape[0]
        for start in range(0, rows, self.step[0]):
            stored = self.array[start:start + self.step[0]].reshape(-1)
            total += widen_into(stored, self.buffer[: stored.size], encoding=self.encoding)
        return total


class Panels:
    """A stored 2-D tensor as the float32 matrix W0 (or W0ᵀ, or W0 / c) for the kernels.

    Parameters
    ----------
    array : ndarray
        The mapped tensor in its file dtype (bfloat16/float8 as their stored bits with
        ``encoding`` naming the format, as :func:`~ddiscan.io.convert.widen` takes it); a
        tensor of more than two dimensions is W0 = its (shape[0], rest) view.
    encoding : str, optional
        The safetensors dtype.
    panel_bytes : int, default PANEL_BYTES
        The size of the float32 buffer of one panel of rows.
    """

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, array=None, *, encoding: str | None = None, panel_bytes: int = PANEL_BYTES,
                 _stored: _Stored | None = None, _transposed: bool = False, _divisor=None):
        self._stored = _stored if _stored is not None else _Stored(array, encoding, panel_bytes)
        self._transposed, self._divisor = _transposed, _divisor

    @classmethod
    def read(cls, array, *, encoding: str | None = None, panel_bytes: int = PANEL_BYTES) -> tuple["Panels", float]:
        """The operator and ‖W0‖_F, from one pass of the panel loop (the precision that
        :func:`~ddiscan.io.convert.widen` states; NaN or Inf when the tensor holds one)."""
        operator = cls(array, encoding=encoding, panel_bytes=panel_bytes)
        return operator, math.sqrt(operator._stored.sum_of_squares())

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self._stored.array.shape
        return (cols, rows) if self._transposed else (rows, cols)

    def _like(self, *, transposed: bool, divisor) -> "Panels":
        return Panels(_stored=self._stored, _transposed=transposed, _divisor=divisor)

    @property
    def mT(self) -> "Panels":
        """The transposed operator (the same stored bytes and buffer)."""
        return self._like(transposed=not self._transposed, divisor=self._divisor)

    T = mT

    def __truediv__(self, divisor) -> "Panels":
        """W0 / c: each widened panel divided by ``c`` in float32, as the dense W0 / c would
        be (dividing again divides by the product of the two)."""
        divisor = divisor if self._divisor is None else self._divisor * divisor
        return self._like(transposed=self._transposed, divisor=divisor)

    def __matmul__(self, other):
        """W0 X (or W0ᵀ X): one pass over the stored tensor, a panel at a time."""
        other = np.asarray(other)
        if other.ndim not in (1, 2) or other.shape[0] != self.shape[1]:
            raise ValueError(f"matmul: operator {self.shape} and operand {other.shape} do not align")
        out_dtype = np.result_type(self.dtype, other.dtype)
        if self._transposed:
            return self._times_transposed(other, out_dtype)
        out = np.empty((self.shape[0], *other.shape[1:]), out_dtype)
        for start, stop, panel in self._stored.panels(self._divisor):
            np.matmul(panel, other, out=out[start:stop])
        return out

    def _times_transposed(self, other, out_dtype):
        """W0ᵀ Y a column panel at a time: rows start:stop of W0ᵀ Y are panelᵀ Y."""
        out = np.empty((self.shape[0], *other.shape[1:]), out_dtype)
        for start, stop, panel in self._stored.panels(self._divisor, axis=1):
            np.matmul(panel.T, other, out=out[start:stop])
        return out

    def peak(self):
        """max |W0| (a float32 scalar, NaN when W0 holds one), one pass of the panel loop."""
        peaks = [np.max(np.abs(panel)) for *_, panel in self._stored.panels(self._divisor)]
        return np.max(np.asarray(peaks, dtype=self.dtype))

    def dense(self) -> np.ndarray:
        """The float32 matrix itself: one :func:`~ddiscan.io.convert.widen` of the whole tensor."""
        stored = self._stored
        matrix, _ = widen(stored.array, np.float32, encoding=stored.encoding)
        if self._divisor is not None:
            matrix /= self._divisor
        return matrix.T if self._transposed else matrix

    def __array__(self, dtype=None, copy=None):
        matrix = self.dense()
        return matrix if dtype is None else matrix.astype(dtype)

    def __array_function__(self, func, types, args, kwargs):
        """``numpy.linalg.matrix_transpose`` and ``numpy.matrix_transpose`` give :attr:`mT`
        (without this NumPy would widen the whole tensor for them); any other NumPy function
        is refused (TypeError): call :meth:`dense` where the matrix is meant."""
        if func in (np.linalg.matrix_transpose, np.matrix_transpose):
            return self.mT
        return NotImplemented

    def __repr__(self) -> str:
        return f"Panels(shape={self.shape}, panel steps={self._stored.step}, stored={self._stored.array.dtype})"
