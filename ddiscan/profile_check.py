"""Checking a base profile when it is opened: its content digest, then every metadata
field and tensor scoring reads (the format is described in :mod:`ddiscan.profile`)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np

from .errors import InputError
from .io.quant import DESCRIPTION_FIELDS, FORMATS
from .io.reader import FLOAT_DTYPES, SafetensorsFile
from .options import SKETCHES
from .profile_ritz import SIDES, specs

__all__ = ["META_KEY", "DIGEST_KEY", "PROFILE_VERSION", "layout", "verified_digest", "checked_meta",
           "check_tensors"]

META_KEY = "ddiscan.profile"
DIGEST_KEY = "ddiscan.profile_sha256"
_SKETCH_FIELDS = {"oversample": 0, "power_iters": 0, "seed": 0}  # integer fields and their minimum
PROFILE_VERSION = 2  # 2: each weight's Ritz values, for the error bar of O (version 1 is still read)


def layout(metadata: dict, tensors) -> bytes:
    """The canonical JSON of a profile's metadata (its digest left out) and of its tensors'
    ``(name, dtype, shape, start, end)``, offsets relative to the data section."""
    table = sorted([name, dtype, list(shape), start, end] for name, dtype, shape, start, end in tensors)
    others = {k: v for k, v in metadata.items() if k != DIGEST_KEY}
    return json.dumps({"metadata": others, "tensors": table}, sort_keys=True).encode("utf-8")


def verified_digest(file: SafetensorsFile, metadata: dict) -> str:
    """The profile's stored digest, after checking it against its content."""
    stored = metadata.get(DIGEST_KEY)
    if stored is None:
        raise InputError(f"{file.path}: a profile without a content digest (written before ddiscan recorded one); "
                         "rebuild it with 'ddiscan profile'")
    start = file.data_offset
    digest = hashlib.sha256(layout(metadata, ((i.name, i.dtype, i.shape, i.start - start, i.end - start)
                                               for i in file.tensors.values())))
    try:
        with open(file.path, "rb") as f:
            f.seek(start)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise InputError(f"{file.path}: cannot read ({exc.strerror or exc})") from None
    if digest.hexdigest() != stored:
        raise InputError(f"{file.path}: the profile's content does not match its sha256 digest (modified or "
                         "corrupt); rebuild it with 'ddiscan profile'")
    return stored


def _is_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def checked_meta(meta, path) -> dict:
    """The profile's weights, after checking every field scoring reads."""
    if not isinstance(meta, dict) or meta.get("version") not in (1, PROFILE_VERSION):
        raise _malformed(path, "version")
    for field, minimum in {"max_t": 1, **_SKETCH_FIELDS}.items():
        if not _is_int(meta.get(field), minimum):
            raise _malformed(path, field)
    if not isinstance(meta.get("exact"), bool):
        raise _malformed(path, "exact")
    _check_kernel(meta, path)
    files = meta.get("base_files")
    if not isinstance(files, list) or not all(map(_is_base_file, files)):
        raise _malformed(path, "base_files")
    weights = meta.get("weights")
    if not isinstance(weights, dict) or not weights:
        raise _malformed(path, "weights")
    for key, entry in weights.items():
        if not _is_weight_entry(entry):
            raise _malformed(path, f"weights.{key}")
    return weights


def _check_kernel(meta: dict, path) -> None:
    """The kernel fields, which profiles record since the block Krylov kernel (absent: subspace iteration)."""
    if "sketch" in meta and meta["sketch"] not in SKETCHES:
        raise _malformed(path, "sketch")
    if "krylov_iters" in meta and not _is_int(meta["krylov_iters"], 0):
        raise _malformed(path, "krylov_iters")


def _malformed(path, field: str) -> InputError:
    return InputError(f"{path}: profile field {field!r} is missing or malformed; rebuild the profile")


def _is_base_file(f) -> bool:
    return (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("sha256"), str)
            and _is_int(f.get("size"), 0))


def _is_weight_entry(entry) -> bool:
    shape = entry.get("shape") if isinstance(entry, dict) else None
    quantization = entry.get("quantization") if isinstance(entry, dict) else None
    return (isinstance(shape, list) and len(shape) >= 2 and all(_is_int(n, 1) for n in shape)
            and entry.get("dtype") in FLOAT_DTYPES
            and (quantization is None or _is_quantization(quantization)))


def _is_quantization(entry) -> bool:
    """A module row's ``quantization`` as report.schema.json allows it: a known format and
    only the fields :data:`~ddiscan.io.quant.DESCRIPTION_FIELDS` names, each of its type
    (strings short and printable)."""
    if not isinstance(entry, dict) or entry.get("format") not in FORMATS:
        return False
    return all(name == "format" or (name in DESCRIPTION_FIELDS and _of_types(value, DESCRIPTION_FIELDS[name]))
               for name, value in entry.items())


def _of_types(value, types) -> bool:
    checks = {"integer": lambda v: _is_int(v, 1), "null": lambda v: v is None,
              "boolean": lambda v: isinstance(v, bool),
              "string": lambda v: isinstance(v, str) and len(v) <= 64 and v.isprintable(),
              "array": lambda v: isinstance(v, list) and len(v) <= 4 and all(_is_int(n, 1) for n in v)}
    return any(checks[t](value) for t in types)


def check_tensors(file: SafetensorsFile, weights: dict, max_t: int, version: int = PROFILE_VERSION) -> None:
    """Every weight's :left, :right and :norm tensors (from version 2 also its Ritz values,
    :mod:`ddiscan.profile_ritz`) are there, with the shapes its recorded shape gives, no
    norm is negative and the Ritz values are what a sketch can give."""
    for key, entry in weights.items():
        rows, cols = entry["shape"][0], math.prod(entry["shape"][1:])
        t = min(max_t, rows, cols)
        ritz = specs(key, t) if version >= 2 else []
        for name, dtype, shape in ((f"{key}:left", "F32", (rows, t)), (f"{key}:right", "F32", (cols, t)),
                                   (f"{key}:norm", "F64", (1,)), *ritz):
            info = file.tensors.get(name)
            if info is None or info.dtype != dtype or tuple(info.shape) != shape:
                raise InputError(f"{file.path}: profile tensor {name!r} is missing or not {dtype} {list(shape)}; "
                                 "rebuild the profile")
        norm = float(np.asarray(file.array(f"{key}:norm"))[0])
        if norm < 0:  # NaN or Inf is a base weight that holds one: scored as not finite
            raise InputError(f"{file.path}: {key}:norm is {norm:g}, a norm cannot be negative")
        if ritz:
            _check_ritz(file, [np.asarray(file.array(name)) for name, _, _ in ritz], [n for n, _, _ in ritz],
                        t=t, size=min(rows, cols))


def _check_ritz(file: SafetensorsFile, arrays, names, *, t: int, size: int) -> None:
    """The stored Ritz values θ (:func:`_is_spectrum`), residual bounds (finite,
    non-negative) and counts (t ≤ m ≤ min(d, k), complete only where m = min(d, k), a
    known side) of one weight with ``t`` columns; a malformed field names its tensor."""
    values, residuals, (count, complete, side) = arrays
    checks = (
        _is_spectrum(values),
        bool(np.all(np.isfinite(residuals)) and np.all(residuals >= 0)),
        t <= count <= size and complete in (0, 1) and (not complete or count == size) and 0 <= side < len(SIDES),
    )
    for name, ok in zip(names, checks):
        if not ok:
            raise _malformed(file.path, name)


def _is_spectrum(values) -> bool:
    """Finite, non-negative and non-increasing (they are copies of sorted values, so exactly:
    every gap θ_j / θ_{j+1} is then at least 1), with every gap finite."""
    if not (np.all(np.isfinite(values)) and np.all(values >= 0) and np.all(np.diff(values) <= 0)):
        return False
    with np.errstate(over="ignore"):
        gaps = values[:-1][values[1:] > 0] / values[1:][values[1:] > 0]
    return bool(np.all(np.isfinite(gaps)))
