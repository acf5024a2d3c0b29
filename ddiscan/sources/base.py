"""The interface every kind of base offers the scan loop."""

from __future__ import annotations

from typing import Protocol

from ..io.reader import TensorInfo


class WeightSource(Protocol):
    """What the scan needs from a base: its keys, each tensor's shape and dtype, the order
    to read them in, a read-ahead hook, the weight itself and its norm, and W0's dominant
    basis (SPEC.md §2)."""

    path: object

    def keys(self): ...

    def __contains__(self, key: str) -> bool: ...

    def info(self, key: str) -> TensorInfo: ...

    def order(self, keys) -> list[str]:
        """``keys`` in the order they are cheapest to read."""

    def fetch(self, key: str):
        """Map what ``load`` needs and bring its bytes into the page cache (runs one
        weight ahead, in a thread)."""

    def load(self, key: str, fetched):
        """``(matrix or None, ‖W‖_F)`` for one key, from what ``fetch`` returned."""

    def basis(self, key: str, matrix, *, module, t: int, xp):
        """Q_t: the top-t basis of the column space of W as ``module`` sees it (d × k,
        :func:`ddiscan.lora.orient`), as a :class:`ddiscan.sketch.Subspace` with its error
        bar; ``matrix`` is what ``load`` returned."""

    def settle(self, parameters: dict) -> tuple[dict, list[str]]:
        """The parameters the report records, and notes for its warnings."""

    def describe(self) -> dict:
        """The base's entry in the report's ``inputs``."""

    def quantization(self, key: str) -> dict | None:
        """How ``key``'s W0 was dequantized (a module row's ``quantization``), None if stored plain."""
