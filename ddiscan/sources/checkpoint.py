"""A checkpoint's weights (one ``.safetensors`` file or a sharded one), widened one at a
time and sketched where a module needs their subspace."""

from __future__ import annotations

import numpy as np

from ..io.convert import widen
from ..io.index import TensorIndex
from ..lora import orient
from ..sketch import Sketch, dominant_subspace


class CheckpointSource:
    """W0 from a :class:`~ddiscan.io.index.TensorIndex`; Ω is kept per shape for the whole scan."""

    def __init__(self, index: TensorIndex, sketch: Sketch):
        self.index, self.sketch, self.path = index, sketch, index.path
        self.omegas: dict = {}

    @classmethod
    def accept(cls, base, sketch: Sketch):
        """Any base that is not another kind: a TensorIndex or what opens as one."""
        return cls(base if isinstance(base, TensorIndex) else TensorIndex(base), sketch)

    def keys(self):
        return self.index.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def info(self, key: str):
        return self.index.info(key)

    def order(self, keys) -> list[str]:
        """File and offset order, so a scan reads each shard front to back."""
        return sorted(keys, key=lambda k: (str(self.index.weight_map[k]), self.index.info(k).start))

    def fetch(self, key: str):
        return self.index.fetch(key)

    def load(self, key: str, fetched):
        """W0 widened to float32 (float64 with ``exact``), and ‖W0‖_F."""
        dtype = np.float64 if self.sketch.exact else np.float32
        return widen(fetched, dtype, encoding=self.index.info(key).dtype)

    def basis(self, key: str, matrix, *, module, t: int, xp):
        """Q_t of ``matrix`` as ``module`` sees it. NumPy takes it as it is (an array, or a
        :class:`~ddiscan.panels.Panels` operator, multiplied panel by panel); any other
        namespace gets the dense matrix (``numpy.asarray``)."""
        w0 = orient(module, matrix)
        w0 = w0 if xp is np else xp.asarray(np.asarray(w0))
        return dominant_subspace(w0, t=t, sketch=self.sketch, xp=xp, omegas=self.omegas)[1]

    def settle(self, parameters: dict) -> tuple[dict, list[str]]:
        return parameters, []

    def describe(self) -> dict:
        return self.index.describe()

    def quantization(self, key: str) -> dict | None:
        return None
