"""A GGUF base (llama.cpp's model file): read through the ``gguf`` package (llama.cpp's own
Python reader, memory-mapped, and its NumPy dequantizers), one weight at a time, under the
Hugging Face names of :mod:`ddiscan.io.ggufnames`.

GGUF lists a tensor's dimensions innermost first (``ne[0]`` = in_features); the reader's
array is in row-major order, so its shape reversed is the Hugging Face (out, in). Every
tensor is offered as float32 (``info``'s dtype), which is what gguf dequantizes to; the
stored type is in :meth:`GGUFSource.quantization`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..errors import InputError, QuantizedBase, printable
from ..io import ggufnames
from ..io.convert import widen
from ..io.index import TensorIndex
from ..io.quantindex import open_checkpoint
from ..io.reader import TensorInfo, note_input, open_regular
from ..sketch import Sketch
from .checkpoint import CheckpointSource



def _gguf():
    try:
        import gguf
    except ImportError:
        raise InputError("reading a GGUF base needs the optional gguf package: pip install 'ddiscan[gguf]'") from None
    return gguf


def _field(reader, name: str, default=None):
    """A scalar or string metadata value (read from the field's parts, as every gguf version stores them)."""
    field = reader.fields.get(name)
    if field is None or not field.data:
        return default
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8", "replace")
    return value.tolist()[0]


def _open_reader(path: Path):
    gguf = _gguf()
    os.close(open_regular(path))  # a regular, readable file (no FIFO, no device)
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise InputError(f"{path}: not a readable GGUF file ({printable(exc)})") from None


class GGUFSource(CheckpointSource):
    """W0 from a ``.gguf`` file: mapped tensors renamed, dequantized, q/k un-permuted."""

    def __init__(self, path, sketch: Sketch):
        self.path, self.sketch, self.omegas = Path(path), sketch, {}
        self.reader = _open_reader(self.path)
        note_input(self.path, self.path.stat())
        self.arch = _field(self.reader, "general.architecture")
        if self.arch not in ggufnames.ARCHITECTURES:
            raise InputError(f"{self.path}: general.architecture {printable(self.arch)!r}; ddiscan maps the tensor "
                             f"names of {', '.join(sorted(ggufnames.ARCHITECTURES))}")
        self.n_head = _field(self.reader, f"{self.arch}.attention.head_count", 0)
        self.n_head_kv = _field(self.reader, f"{self.arch}.attention.head_count_kv", self.n_head)
        self.tensors = self._mapped()
        self._checked: set[str] = set()

    def _mapped(self) -> dict:
        tensors = {}
        for tensor in self.reader.tensors:
            key = ggufnames.hf_name(tensor.name, self.arch)
            if key is not None:
                if len(tensor.shape) != 2:
                    raise InputError(f"{self.path}: tensor {printable(tensor.name)} has dims "
                                     f"{tensor.shape.tolist()}; expected 2 (in, out)")
                tensors[key] = tensor
        return tensors

    @classmethod
    def accept(cls, base, sketch: Sketch):
        """A path ending in ``.gguf``; None for any other base."""
        return cls(base, sketch) if is_gguf(base) else None

    def keys(self):
        return self.tensors.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def info(self, key: str) -> TensorInfo:
        tensor = self.tensors[key]
        self._check_type(key, tensor)
        start = int(tensor.data_offset)
        return TensorInfo(key, "F32", tuple(int(d) for d in reversed(tensor.shape.tolist())),
                          start, start + int(tensor.n_bytes))

    def _check_type(self, key: str, tensor) -> None:
        """QuantizedBase unless gguf can dequantize the tensor's type (tried on one row)."""
        if key in self._checked:
            return
        try:
            _gguf().quants.dequantize(np.asarray(tensor.data[:1]), tensor.tensor_type)
        except NotImplementedError:
            raise QuantizedBase(f"{printable(tensor.name)} ({key}): GGUF type {tensor.tensor_type.name}, which the "
                                "installed gguf package cannot dequantize") from None
        self._checked.add(key)

    def order(self, keys) -> list[str]:
        """File order, so a scan reads the file front to back."""
        return sorted(keys, key=lambda k: int(self.tensors[k].data_offset))

    def fetch(self, key: str):
        data = self.tensors[key].data
        if data.size:
            int(data.reshape(-1).view(np.uint8)[::4096].max())
        return data

    def load(self, key: str, fetched):
        """W0 (float64 with ``exact``) and ‖W0‖_F."""
        return widen(self._dequantized(key, fetched), np.float64 if self.sketch.exact else np.float32)

    def array(self, key: str) -> np.ndarray:
        """W0 as float32, as :meth:`TensorIndex.array` offers a checkpoint's tensor (prune, profile)."""
        return self._dequantized(key, self.tensors[key].data)

    mapped = array

    @property
    def files(self) -> list[Path]:
        return [self.path]

    def _dequantized(self, key: str, data) -> np.ndarray:
        """W0 dequantized by gguf (float32), in the Hugging Face row order."""
        tensor, shape = self.tensors[key], self.info(key).shape
        w = _gguf().quants.dequantize(np.asarray(data), tensor.tensor_type)
        if w.size != math.prod(shape):
            raise InputError(f"{printable(tensor.name)} ({key}): {w.size} values; its dims say {list(shape)}")
        w = w.reshape(shape)
        heads = ggufnames.permuted_heads(tensor.name, self.arch, self.n_head, self.n_head_kv)
        if heads is not None:
            w = ggufnames.unpermute(w, heads, f"{tensor.name} ({key})")
        return w

    def quantization(self, key: str) -> dict:
        """The report's entry for how W0 was obtained."""
        return {"format": "gguf", "type": self.tensors[key].tensor_type.name}

    def describe(self) -> dict:
        return {"path": str(self.path), "files": [{"path": str(self.path), "size": self.path.stat().st_size}]}


def is_gguf(base) -> bool:
    return isinstance(base, (str, Path)) and str(base).endswith(".gguf")


def open_weights(base, sketch: Sketch | None = None):
    """What prune and profile read a base's weights through: a GGUF base's source, else a
    checkpoint as :func:`~ddiscan.io.quantindex.open_checkpoint` opens it (dequantized where its
    config declares a scheme ddiscan decodes)."""
    if is_gguf(base):
        return GGUFSource(base, sketch or Sketch())
    return open_checkpoint(base)
