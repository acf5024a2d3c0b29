"""A safetensors header, validated by the rules the safetensors library enforces.

``safetensors``'s ``Metadata::validate``: a JSON object with no repeated key, known dtypes,
shapes of non-negative integers, each byte size equal to numel × dtype size, and data
offsets that tile the data region from 0 with no gap or overlap. (The length bound and
the file size are checked where the file is opened, :mod:`ddiscan.io.reader`.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import prod
from pathlib import Path

from ..errors import HeaderError, NotSafetensors
from .jsonfile import parse_json

__all__ = ["MAX_HEADER_SIZE", "DTYPE_BITS", "TensorInfo", "parse_header"]

MAX_HEADER_SIZE = 100_000_000

# dtype name -> size in bits, for every dtype the safetensors format defines.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in its file: ``start``/``end`` are absolute byte offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return prod(self.shape)


def _no_duplicates(pairs):
    seen = dict(pairs)
    if len(seen) != len(pairs):  # rare: find the first repeated key for the message
        keys = set()
        for key, _ in pairs:
            if key in keys:
                raise HeaderError(f"duplicate key {key!r}")
            keys.add(key)
    return seen


def parse_header(raw: bytes, path: Path, data_offset: int, data_size: int):
    """Tensors (offsets made absolute by ``data_offset``) and metadata of a header."""
    try:
        header = parse_json(raw, "header", path, object_pairs_hook=_no_duplicates, error=NotSafetensors)
    except HeaderError as exc:
        raise HeaderError(f"{path}: header has a {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise HeaderError(f"{path}: __metadata__ must map strings to strings")
    tensors = {}
    for name in list(header):  # popped as read: each JSON entry is freed once converted
        tensors[name] = _tensor_info(name, header.pop(name), path, data_offset)
    _check_offsets(tensors, path, data_offset, data_size)
    return tensors, metadata


def _tensor_info(name: str, entry, path: Path, data_offset: int = 0) -> TensorInfo:
    if not isinstance(entry, dict):
        raise HeaderError(f"{path}: entry for tensor {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise HeaderError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        raise HeaderError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if not _valid_offsets(offsets):
        raise HeaderError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    nbits = prod(shape) * DTYPE_BITS[dtype]
    if nbits % 8 or nbits // 8 != offsets[1] - offsets[0]:
        raise HeaderError(
            f"{path}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes but "
            f"{dtype}{shape} needs {nbits // 8}" + (f" bytes and {nbits % 8} bits" if nbits % 8 else "")
        )
    return TensorInfo(name, dtype, tuple(shape), offsets[0] + data_offset, offsets[1] + data_offset)


def _valid_offsets(offsets) -> bool:
    """``[begin, end]``: two non-negative integers, begin ≤ end."""
    return (isinstance(offsets, list) and len(offsets) == 2
            and all(type(n) is int and n >= 0 for n in offsets) and offsets[0] <= offsets[1])


def _check_offsets(tensors: dict, path: Path, data_offset: int, data_size: int) -> None:
    """Data offsets (absolute, from ``data_offset``) tile the data region: no gap, no overlap."""
    end = data_offset
    for info in sorted(tensors.values(), key=lambda i: (i.start, i.end)):
        if info.start != end:
            kind = "overlaps the previous tensor" if info.start < end else "leaves a gap before it"
            raise HeaderError(
                f"{path}: tensor {info.name!r} {kind} (offset {info.start - data_offset}, "
                f"expected {end - data_offset})"
            )
        end = info.end
    if end - data_offset != data_size:
        raise HeaderError(
            f"{path}: tensors cover {end - data_offset} bytes of data but the file holds {data_size} "
            "(truncated or padded file)"
        )
