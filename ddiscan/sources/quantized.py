"""A quantized checkpoint (ddiscan/io/quant.py's schemes) as a base: each weight's stored
tensors read and dequantized one weight at a time, to float32 (float64 with ``exact``), and
each module's row told how its W0 was obtained. Weights the checkpoint keeps as plain floats
read as in any checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..io.convert import frobenius
from ..io.index import TensorIndex
from ..io.quantindex import QuantizedIndex, choose
from ..sketch import Sketch
from .checkpoint import CheckpointSource


class QuantizedSource(CheckpointSource):
    """W0 from a :class:`~ddiscan.io.quantindex.QuantizedIndex`."""

    index: QuantizedIndex

    @classmethod
    def accept(cls, base, sketch: Sketch):
        """A QuantizedIndex, or a checkpoint path whose config.json declares a scheme ddiscan decodes."""
        if isinstance(base, QuantizedIndex):
            return cls(base, sketch)
        if isinstance(base, TensorIndex) or not isinstance(base, (str, os.PathLike)):
            return None
        chosen = choose(Path(os.fspath(base)))
        return None if chosen is None else cls(QuantizedIndex(base, *chosen), sketch)

    def load(self, key: str, fetched):
        if key not in self.index.quantized:
            return super().load(key, fetched)
        w0 = self.index.array(key, np.float64 if self.sketch.exact else np.float32)
        return w0, frobenius(w0)

    def quantization(self, key: str) -> dict | None:
        return self.index.quantization(key)
