"""One safetensors file: its header, validated, and its tensors, memory-mapped one at a time.

The header is checked by the rules the safetensors library enforces (``safetensors``'s
``Metadata::validate``): header length at most 100 MB, JSON object, known dtypes, shapes of
non-negative integers, data offsets contiguous from 0 with no gap or overlap, each byte size
equal to numel × dtype size, and header + data equal to the file size.

Tensors are returned as read-only ``numpy.memmap`` views of the data region, so nothing is
read until it is used and a tensor costs no memory until converted. (``safe_open`` with
``framework="np"`` copies each tensor and cannot read float8; the format is simple enough
that mapping it directly is both faster and smaller.)
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from . import dtypes
from .inputs import InputRecord, collecting_inputs, inputs_read, note_input, open_regular
from .header import DTYPE_BITS, MAX_HEADER_SIZE, TensorInfo, parse_header
from ..errors import InputError, NotSafetensors, PickleRefused, UnsupportedDtype

__all__ = [
    "sha256", "TensorInfo", "SafetensorsFile", "MAX_HEADER_SIZE", "check_not_pickle", "stored_as",
    "open_regular", "InputRecord", "note_input", "collecting_inputs", "inputs_read", "DTYPE_BITS",
]

# dtypes ddiscan can map as numpy arrays; BF16 and float8 are mapped as their bits
# (ddiscan/io/dtypes.py decodes them).
NUMPY_DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16), "U16": np.dtype(np.uint16), "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32), "I64": np.dtype(np.int64), "U64": np.dtype(np.uint64),
    "F16": np.dtype(np.float16), "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
    **dtypes.STORAGE,
}

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def stored_as(values, dtype: str) -> np.ndarray:
    """``values`` as a tensor of safetensors dtype ``dtype`` would store them (rounded)."""
    if dtype in dtypes.ENCODED:
        return dtypes.encode(values, dtype)
    return np.asarray(values).astype(NUMPY_DTYPES[dtype])


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def sha256(path) -> str:
    """The hex sha256 of a file (or of an open :class:`SafetensorsFile`, read through the
    descriptor it holds), read in 1 MiB chunks."""
    if isinstance(path, SafetensorsFile):
        return path.sha256()
    digest = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_not_pickle(path: Path) -> None:
    """Refuse pickled checkpoints by name or by their first bytes (a file that is not a
    regular file is refused by name only: it is never opened, so a FIFO cannot hang)."""
    head = b""
    if path.suffix not in _PICKLE_SUFFIXES:
        try:
            fd = open_regular(path)
        except InputError:
            fd = None
        if fd is not None:
            with os.fdopen(fd, "rb") as f:
                head = f.read(9)
    # a safetensors header of 640, 896, 1152, 1408 or 19280 bytes makes the 8-byte length
    # prefix start with a pickle/zip magic; the '{' that opens its JSON tells them apart
    looks_safetensors = head[8:9] == b"{"
    magic = head[:2] in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
    if path.suffix in _PICKLE_SUFFIXES or (magic and not looks_safetensors):
        raise PickleRefused(
            f"{path}: a pickled PyTorch checkpoint; ddiscan never unpickles files, because "
            "unpickling runs arbitrary code from the file. Convert it to safetensors first."
        )


class SafetensorsFile:
    """A validated safetensors file whose tensors are mapped on demand.

    Parameters
    ----------
    path : path-like
        The file. Its header is read and validated at once; no tensor data is read.
    record : bool
        Record the file as an input of the command (:func:`note_input`).
    """

    def __init__(self, path, *, record: bool = True):
        self.path = Path(path)
        check_not_pickle(self.path)
        self._file = os.fdopen(open_regular(self.path), "rb", buffering=0)
        st = os.fstat(self._file.fileno())
        self.size = st.st_size
        self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        try:
            prefix = os.pread(self._file.fileno(), 8, 0)
            if len(prefix) < 8:
                raise NotSafetensors(f"{self.path}: not a safetensors file (only {len(prefix)} bytes)")
            (header_size,) = struct.unpack("<Q", prefix)
            # the length is not echoed: for a file that is no safetensors file, those are its
            # first 8 bytes (of a secret, perhaps)
            if header_size > MAX_HEADER_SIZE:
                raise NotSafetensors(
                    f"{self.path}: not a safetensors file (its header length exceeds the format's limit of "
                    f"{MAX_HEADER_SIZE} bytes)"
                )
            if 8 + header_size > self.size:
                raise NotSafetensors(
                    f"{self.path}: not a safetensors file or truncated (its header length exceeds the file size)"
                )
            raw = os.pread(self._file.fileno(), header_size, 8)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        if len(raw) != header_size:
            raise InputError(f"{self.path}: changed while ddiscan read it (shorter than when opened)")
        if not raw.lstrip().startswith(b"{"):
            raise NotSafetensors(f"{self.path}: not a safetensors file (header does not start with '{{')")
        self.data_offset = 8 + header_size
        self.tensors: dict[str, TensorInfo]
        self.tensors, self.metadata = parse_header(raw, self.path, self.data_offset, self.size - self.data_offset)
        if record:  # an input (note_input); an old output about to be replaced is not
            note_input(self.path, st, self)

    def check_unchanged(self) -> None:
        """InputError unless the file is as it was opened: the descriptor held open has the
        same size and modification time, and the path still names that file (not one renamed
        over it). Called before each tensor is mapped or read, so that nothing is mapped past
        the file's end (a read there would be a SIGBUS, which Python cannot catch), and before
        an output is written."""
        try:
            st = os.fstat(self._file.fileno())
            now = os.stat(self.path)
        except (OSError, ValueError):
            now = st = None
        if (
            st is None or (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._identity
            or (now.st_dev, now.st_ino) != self._identity[:2]
        ):
            raise InputError(f"{self.path}: changed while ddiscan read it (replaced, truncated or rewritten); "
                             "run again on a file nothing writes to")

    def fileno(self) -> int:
        """The descriptor held open on the file (every read goes through it)."""
        return self._file.fileno()

    def sha256(self) -> str:
        """The hex sha256 of the file, read through the descriptor held open."""
        self.check_unchanged()
        digest = hashlib.sha256()
        for start in range(0, self.size, 1 << 20):
            digest.update(self._pread(start, min(1 << 20, self.size - start)))
        return digest.hexdigest()

    def _pread(self, start: int, length: int) -> bytes:
        data = os.pread(self._file.fileno(), length, start)
        if len(data) != length:
            raise InputError(f"{self.path}: changed while ddiscan read it (ended inside its data)")
        return data

    def chunks(self, name: str, size: int = 1 << 22):
        """The stored bytes of tensor ``name`` in chunks of at most ``size`` bytes."""
        info = self.tensors[name]
        self.check_unchanged()
        for start in range(info.start, info.end, size):
            yield self._pread(start, min(size, info.end - start))

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self.tensors)} tensors)"

    def keys(self):
        return self.tensors.keys()

    def array(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only float (or integer) array: a memory map in its file
        dtype, or, for bfloat16 and float8, a float32 copy of its values."""
        mapped = self.mapped(name)
        encoding = self.tensors[name].dtype
        return dtypes.decode(mapped, encoding) if encoding in dtypes.ENCODED else mapped

    def mapped(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only memory map, no copy: in its file dtype, or, for
        bfloat16 and float8, as its stored bits (``widen(..., encoding=dtype)`` reads them)."""
        info = self.tensors[name]
        if info.dtype not in NUMPY_DTYPES:
            raise UnsupportedDtype(f"{self.path}: tensor {name!r} has dtype {info.dtype}, which ddiscan cannot read")
        dtype = NUMPY_DTYPES[info.dtype]
        if info.numel == 0:
            return np.empty(info.shape, dtype)
        self.check_unchanged()  # the file still covers the tensor: mapping it cannot fault
        try:
            flat = np.memmap(self._file, dtype=dtype, mode="r", offset=info.start, shape=(info.numel,))
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.path}: cannot map tensor {name!r} ({getattr(exc, 'strerror', None) or exc})") from None
        self.check_unchanged()
        return flat.reshape(info.shape)

    def raw_bytes(self, name: str) -> bytes:
        """The stored bytes of tensor ``name``, exactly as in the file."""
        return b"".join(self.chunks(name))
