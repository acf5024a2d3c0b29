"""Which file holds which tensor: a single file, a sharded checkpoint, a directory.

A base checkpoint may be given as

* one ``.safetensors`` file;
* a sharded checkpoint's ``*.safetensors.index.json`` (its ``weight_map`` names each
  tensor's shard);
* a directory holding either of those (an index wins; otherwise every ``*.safetensors``
  file in it, no key in two of them).

With an index, a shard's header is read the first time one of its tensors is asked for,
so a scan touches only the shards that hold tensors it needs; without one, every file's
header is read when the checkpoint is opened (that is how its keys are known).

A quantized checkpoint is refused when it is opened (:class:`~ddiscan.errors.QuantizedBase`):
ddiscan decodes no quantization scheme, and a quantized weight read as plain numbers gives
a wrong score. Two things tell: the ``quantization_config`` that transformers writes into
the ``config.json`` beside the weights for every scheme (its ``quant_method`` names the
scheme), and, without such a config, packed weights (GPTQ and AWQ store ``qweight``,
compressed-tensors ``weight_packed``) in place of ``.weight``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError, QuantizedBase
from .jsonfile import read_json
from .quant import quantization_config, scheme_label
from .reader import SafetensorsFile, TensorInfo, check_not_pickle

__all__ = ["TensorIndex", "resolve_checkpoint", "quantization_scheme", "model_config", "warm"]

# the packed integer tensors quantization schemes store instead of ``<module>.weight``
# (AutoGPTQ/AutoAWQ's QuantLinear: qweight, qzeros, scales; compressed-tensors'
# pack-quantized compressor: weight_packed, weight_scale, weight_shape)
_PACKED_WEIGHTS = {"qweight": "GPTQ or AWQ", "weight_packed": "compressed-tensors"}


def _require_exists(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied")


def resolve_checkpoint(path) -> tuple[Path, list[Path] | None]:
    """Classify ``path``: return ``(index_json, None)`` or ``(None, [files])``."""
    path = Path(path)
    _require_exists(path)
    if path.is_file():
        if path.name.endswith(".index.json"):
            return path, None
        check_not_pickle(path)
        return None, [path]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0], None
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise InputError(f"{path}: several checkpoint indexes ({names}); name the one to use")
    files = sorted(path.glob("*.safetensors"))
    if files:
        return None, files
    pickles = sorted(p for ext in ("*.bin", "*.pt", "*.pth") for p in path.glob(ext))
    if pickles:
        check_not_pickle(pickles[0])
    raise InputError(f"{path}: no .safetensors file or *.safetensors.index.json in this directory")


def quantization_scheme(config: dict) -> str | None:
    """The scheme a model ``config.json``'s ``quantization_config`` says its weights are
    stored in, or None when it declares none (or a bitsandbytes config that loads nothing
    in 4 or 8 bits)."""
    quant = quantization_config(config)
    return None if quant is None else scheme_label(quant)


def model_config(path: Path) -> tuple[Path, object]:
    """The ``config.json`` beside the checkpoint at ``path`` and its content (None if absent)."""
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.exists():
        return config, None
    return config, read_json(config, "the model config, for its quantization_config")


def _check_unquantized(path: Path, keys) -> None:
    """QuantizedBase if the checkpoint at ``path`` holds quantized weights."""
    config, data = model_config(path)
    if data is not None:
        scheme = quantization_scheme(data) if isinstance(data, dict) else None
        if scheme is not None:
            raise QuantizedBase(
                f"{path}: quantized with {scheme} ({config} quantization_config); ddiscan reads unquantized "
                "bases only — score against the unquantized checkpoint"
            )
    for key in keys:
        scheme = _PACKED_WEIGHTS.get(key.rsplit(".", 1)[-1])
        if scheme is not None:
            raise QuantizedBase(
                f"{path}: quantized with {scheme} ({key} is a packed quantized weight); ddiscan reads "
                "unquantized bases only — score against the unquantized checkpoint"
            )


def warm(file: SafetensorsFile, name: str) -> np.ndarray:
    """Tensor ``name`` of ``file`` mapped, with its bytes brought into the page cache: the
    kernel is advised to read them (``posix_fadvise``) and one byte of each page is touched,
    which waits on I/O rather than the CPU; meant for a background thread."""
    array = file.mapped(name)
    info = file.tensors[name]
    if info.end > info.start:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(file.fileno(), info.start, info.end - info.start, os.POSIX_FADV_WILLNEED)
        int(array.reshape(-1).view(np.uint8)[::4096].max())
    return array


class TensorIndex:
    """Map tensor names to the files that hold them, opening each file at most once.

    Parameters
    ----------
    path : path-like
        A ``.safetensors`` file, an ``*.index.json``, or a directory holding either.
    quantized : bool, default False
        Open a quantized checkpoint as it is stored (for :class:`~ddiscan.io.quantindex.QuantizedIndex`,
        which dequantizes it); otherwise one is refused.
    """

    def __init__(self, path, *, quantized: bool = False):
        self.path = Path(path)
        self._open: dict[Path, SafetensorsFile] = {}
        index, files = resolve_checkpoint(self.path)
        if index is not None:
            self.weight_map = self._read_index(index)
            self.files = sorted(set(self.weight_map.values()))
        else:
            self.files = files
            self.weight_map = {}
            for file in files:
                for name in self._file(file).keys():
                    if name in self.weight_map:
                        raise InputError(
                            f"{self.path}: tensor {name!r} is in both {self.weight_map[name].name} and {file.name}"
                        )
                    self.weight_map[name] = file
        if not quantized:
            _check_unquantized(self.path, self.weight_map)

    @staticmethod
    def _read_index(index: Path) -> dict[str, Path]:
        data = read_json(index, "a checkpoint index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError(f"{index}: checkpoint index has no valid 'weight_map'")
        resolved = {}
        for name, shard in weight_map.items():
            shard_path = index.parent / shard
            if Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise InputError(f"{index}: shard name {shard!r} points outside the checkpoint directory")
            resolved[name] = shard_path
        for shard_path in set(resolved.values()):
            _require_exists(shard_path)
        return resolved

    def _file(self, path: Path) -> SafetensorsFile:
        if path not in self._open:
            self._open[path] = SafetensorsFile(path)
        return self._open[path]

    def keys(self):
        return self.weight_map.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> SafetensorsFile:
        return self._file(self.weight_map[name])

    def info(self, name: str) -> TensorInfo:
        file = self.file_of(name)
        if name not in file.tensors:
            raise InputError(f"{file.path}: the index says it holds {name!r}, but it does not")
        return file.tensors[name]

    def fetch(self, name: str) -> np.ndarray:
        """Tensor ``name`` mapped, with its bytes brought into the page cache (:func:`warm`)."""
        self.info(name)
        return warm(self.file_of(name), name)

    def array(self, name: str) -> np.ndarray:
        """Tensor ``name``'s values (see :meth:`SafetensorsFile.array`)."""
        self.info(name)
        return self.file_of(name).array(name)

    def mapped(self, name: str) -> np.ndarray:
        """Tensor ``name`` memory-mapped, bfloat16/float8 as bits (see :meth:`SafetensorsFile.mapped`)."""
        self.info(name)
        return self.file_of(name).mapped(name)

    def describe(self) -> dict:
        """Paths and sizes of the files, for the report."""
        return {
            "path": str(self.path),
            "files": [{"path": str(p), "size": p.stat().st_size} for p in self.files],
        }
