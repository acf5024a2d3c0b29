"""A quantized checkpoint seen as the plain one it stands for.

:class:`QuantizedIndex` is a :class:`~ddiscan.io.index.TensorIndex` whose keys are the
model's: each weight stored in a scheme of :data:`ddiscan.io.quant.SCHEMES` shows as
``<stem>.weight`` (float32, W0's shape) and its stored tensors (codes, scales, quant_state)
are hidden; every other key (norms, an ``lm_head`` kept in bf16, modules_to_not_convert)
reads as in any checkpoint. Reading a quantized weight reads only its parts and
dequantizes that one weight. :func:`open_checkpoint` opens a base as one or the other,
from the ``config.json`` beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import QuantizedBase, printable
from . import quant
from .index import TensorIndex, model_config, warm
from .reader import TensorInfo

__all__ = ["QuantizedIndex", "open_checkpoint", "choose"]


def choose(path: Path):
    """``(schemes, meta)`` when the config.json beside the checkpoint at ``path`` declares a
    scheme ddiscan decodes; None when it declares none; QuantizedBase for any other."""
    where, config = model_config(path)
    if not isinstance(config, dict):
        return None
    try:
        return quant.select(config)
    except QuantizedBase as exc:
        raise QuantizedBase(f"{path}: {exc} ({where} quantization_config), a scheme ddiscan does not decode; "
                            "score against the unquantized checkpoint") from None


def open_checkpoint(path) -> TensorIndex:
    """The checkpoint at ``path``: a QuantizedIndex when its config.json declares a scheme
    ddiscan decodes, else a TensorIndex (which refuses any other quantized checkpoint)."""
    if isinstance(path, TensorIndex):
        return path
    chosen = choose(Path(path))
    return TensorIndex(path) if chosen is None else QuantizedIndex(path, *chosen)


def _stems(keys):
    """Every prefix of a key a quantized weight's stem could be (up to three trailing names
    dropped: ``q_proj.weight.quant_state.bitsandbytes__nf4`` → ``q_proj``)."""
    stems = set()
    for key in keys:
        parts = key.split(".")
        stems.update(".".join(parts[:-n]) for n in range(1, min(4, len(parts))))
    return stems


class _Stored:
    """A QuantizedIndex's stored tensors by their own keys (which its listing hides)."""

    def __init__(self, index: "QuantizedIndex"):
        self.index = index

    def _file(self, key: str):
        self.index._stored_info(key)
        return self.index._file(self.index.stored[key])

    def array(self, key: str) -> np.ndarray:
        return self._file(key).array(key)

    def mapped(self, key: str) -> np.ndarray:
        return self._file(key).mapped(key)


class QuantizedIndex(TensorIndex):
    """The checkpoint at ``path``, its weights stored in ``schemes`` with config ``meta``."""

    def __init__(self, path, schemes, meta: dict):
        super().__init__(path, quantized=True)
        self.schemes, self.meta = schemes, meta
        self.stored = self.weight_map
        self.quantized: dict[str, tuple] = {}
        for stem in sorted(_stems(self.stored)):
            try:
                found = quant.find(stem, self.stored.keys(), schemes)
            except QuantizedBase as exc:
                raise QuantizedBase(f"{self.path}: {exc}") from None
            if found is not None:
                self.quantized[stem + ".weight"] = found
        hidden = {key for _, parts in self.quantized.values() for key in parts.values()}
        self.weight_map = {k: v for k, v in self.stored.items() if k not in hidden}
        for key, (_, parts) in self.quantized.items():
            self.weight_map[key] = self.stored[self._main(parts)]
        self._metas: dict[str, dict] = {}
        self._shapes: dict[str, tuple] = {}

    @staticmethod
    def _main(parts: dict) -> str:
        return parts.get("weight") or next(iter(parts.values()))

    def _stored_info(self, key: str) -> TensorInfo:
        file = self._file(self.stored[key])
        if key not in file.tensors:
            raise QuantizedBase(f"{file.path}: the index says it holds {printable(key)}, but it does not")
        return file.tensors[key]

    def _read(self, parts: dict, *, mapped: bool) -> dict:
        return quant.read_parts(_Stored(self), parts, mapped=mapped)

    def _call(self, name: str, call, *args, **kwargs):
        """``call`` of quantized ``name``'s scheme, a QuantizedBase naming a role (its
        message's first word) told as the stored key it stands for and the file."""
        scheme, parts = self.quantized[name]
        try:
            return call(*args, **kwargs)
        except QuantizedBase as exc:
            role, _, message = str(exc).partition(": ")
            where = f"{printable(parts[role])} ({scheme.name} {role})" if role in parts else role
            raise QuantizedBase(f"{self.path}: {where}: {message}") from None

    def meta_of(self, key: str) -> dict:
        """The config's quantization settings with what ``key``'s own tensors store."""
        if key not in self._metas:
            scheme, parts = self.quantized[key]
            stem = key.removesuffix(".weight")
            meta = self._call(key, scheme.settings, self.meta, stem) if scheme.settings else self.meta
            state = self._call(key, scheme.state, self._read(parts, mapped=True)) if scheme.state else {}
            self._metas[key] = {**meta, **state}
        return self._metas[key]

    def quantization(self, key: str) -> dict | None:
        """The report's ``quantization`` entry for ``key``: how its W0 was obtained, or None."""
        if key not in self.quantized:
            return None
        return self._call(key, self.quantized[key][0].describe, self.meta_of(key))

    def info(self, name: str) -> TensorInfo:
        if name not in self.quantized:
            return super().info(name)
        if name not in self._shapes:
            scheme, parts = self.quantized[name]
            if scheme.shape is not None:
                shape = self._call(name, scheme.shape, self._read(parts, mapped=True), self.meta_of(name))
            else:
                shape = self.array(name).shape
            self._shapes[name] = tuple(int(n) for n in shape)
        main = self._stored_info(self._main(self.quantized[name][1]))
        return TensorInfo(name, "F32", self._shapes[name], main.start, main.end)

    def dequantize(self, name: str, arrays: dict, dtype=np.float32) -> np.ndarray:
        """W0 of quantized ``name`` from its stored tensors (as :func:`~ddiscan.io.quant.read_parts` gives them)."""
        scheme = self.quantized[name][0]
        w0 = self._call(name, scheme.dequantize, arrays, meta=self.meta_of(name), dtype=np.dtype(dtype))
        expected = self._shapes.get(name)
        if expected is not None and tuple(w0.shape) != expected:
            raise QuantizedBase(f"{self.path}: {printable(name)} dequantizes to {list(w0.shape)}, "
                                f"expected {list(expected)}")
        return w0

    def fetch(self, name: str):
        """A quantized weight's stored tensors mapped and brought into the page cache (the
        read-ahead thread's part); :meth:`array` then decodes and dequantizes them."""
        if name not in self.quantized:
            return super().fetch(name)
        parts = self.quantized[name][1]
        for key in parts.values():
            self._stored_info(key)
            warm(self._file(self.stored[key]), key)
        return parts

    def array(self, name: str, dtype=np.float32) -> np.ndarray:
        """Tensor ``name``'s values; a quantized weight dequantized to ``dtype``."""
        if name not in self.quantized:
            return super().array(name)
        return self.dequantize(name, self._read(self.quantized[name][1], mapped=False), dtype)

    def mapped(self, name: str) -> np.ndarray:
        return self.array(name)

    def describe(self) -> dict:
        return {**super().describe(), "quantization": quant.scheme_label(self.meta)}
