"""The alignment update A = W_aligned − W_unaligned of SafeLoRA and SPLoRA, in place of W0.

The base still names the weights (matching, reading order, the report's ``inputs``); the
matrix a module is scored against is A, read from the aligned checkpoint and its
unaligned twin.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError, ShapeMismatch
from ..io.convert import frobenius, widen
from ..io.index import TensorIndex
from ..lora import orient
from ..sketch import Sketch, dominant_subspace

__all__ = ["AlignmentDifference", "alignment_pair", "alignment_update"]


class AlignmentDifference:
    """A for every key of ``base`` (a checkpoint or profile source); its basis is A's own."""

    def __init__(self, base, aligned, unaligned, sketch: Sketch):
        self.base, self.path, self.sketch = base, base.path, sketch
        self.pair = (TensorIndex(aligned), TensorIndex(unaligned))
        self.omegas: dict = {}

    def keys(self):
        return self.base.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.base

    def info(self, key: str):
        return self.base.info(key)

    def order(self, keys) -> list[str]:
        return self.base.order(keys)

    def fetch(self, key: str):
        return alignment_pair(self.pair, key, self.base.info(key).shape)

    def load(self, key: str, fetched):
        """A in float32, and ‖A‖_F."""
        diff = _difference(self.pair, key, *fetched)
        return diff, frobenius(diff)

    def basis(self, key: str, matrix, *, module, t: int, xp):
        a = xp.asarray(orient(module, matrix))
        return dominant_subspace(a, t=t, sketch=self.sketch, xp=xp, omegas=self.omegas)[1]

    def settle(self, parameters: dict) -> tuple[dict, list[str]]:
        return self.base.settle(parameters)

    def describe(self) -> dict:
        return self.base.describe()

    def quantization(self, key: str) -> dict | None:
        return None  # the update is a difference of two checkpoints, not a base weight


def alignment_pair(pair, key: str, shape) -> tuple[np.ndarray, np.ndarray]:
    """W_aligned and W_unaligned for one base key, mapped and fetched, checked against the
    base's shape."""
    for index in pair:
        if key not in index:
            raise InputError(f"{index.path}: has no {key}, which the adapter updates")
        if tuple(index.info(key).shape) != tuple(shape):
            raise ShapeMismatch(f"{index.path}: {key} is {list(index.info(key).shape)}, the base's is {list(shape)}")
    return pair[0].fetch(key), pair[1].fetch(key)


def alignment_update(pair, key: str, shape) -> np.ndarray:
    """A = W_aligned − W_unaligned for one base key, float32."""
    return _difference(pair, key, *alignment_pair(pair, key, shape))


def _difference(pair, key: str, aligned, unaligned) -> np.ndarray:
    diff, _ = widen(aligned, encoding=pair[0].info(key).dtype)
    diff -= widen(unaligned, encoding=pair[1].info(key).dtype)[0]
    return diff
