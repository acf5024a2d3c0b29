"""A checkpoint's weights (one ``.safetensors`` file or a sharded one), read one at a time
and sketched where a module needs their subspace: multiplied panel by panel from the
mapped bytes (:mod:`ddiscan.panels`), widened whole only for ``exact``."""

from __future__ import annotations

import numpy as np

from ..io.convert import widen
from ..io.index import TensorIndex
from ..lora import orient
from ..panels import Panels
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
        """W0 as a :class:`~ddiscan.panels.Panels` operator over the mapped bytes (float32
        products, a panel of rows widened at a time), or widened whole to float64 for the
        ``exact`` SVD; and ‖W0‖_F."""
        encoding = self.index.info(key).dtype
        if self.sketch.exact:
            return widen(fetched, np.float64, encoding=encoding)
        return Panels.read(fetched, encoding=encoding)

    def basis(self, key: str, matrix, *, module, t: int, xp):
        """Q_t of ``matrix`` as ``module`` sees it: NumPy multiplies an operator panel by
        panel, any other namespace gets the dense matrix (``numpy.asarray``: one widening)."""
        w0 = orient(module, matrix)
        w0 = w0 if xp is np else xp.asarray(np.asarray(w0))
        return dominant_subspace(w0, t=t, sketch=self.sketch, xp=xp, omegas=self.omegas)[1]

    def settle(self, parameters: dict) -> tuple[dict, list[str]]:
        return parameters, []

    def describe(self) -> dict:
        return self.index.describe()

    def quantization(self, key: str) -> dict | None:
        return None
