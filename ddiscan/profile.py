"""Base profiles: what scoring needs from each base weight, without the base.

A profile (``*.ddiprofile``) is a safetensors file holding, for every weight a LoRA could
target, an orthonormal basis of its dominant column space (``<key>:left``, rows × T), one
of its dominant row space (``<key>:right``, columns × T), both ordered by singular value
so that any t ≤ T is a prefix, its Frobenius norm (``<key>:norm``) and what the error
bar of O needs for every t ≤ T (``<key>:ritz``, ``:residuals``, ``:ritz_info``, from
version 2: :mod:`ddiscan.profile_ritz`); its
``__metadata__["ddiscan.profile"]`` (JSON) holds each weight's stored shape and dtype,
the sketch parameters, the seed, and the base files' names, sizes and sha256. It is a
few percent of the base's size, is written one weight at a time, and is accepted
anywhere a base is.

``__metadata__["ddiscan.profile_sha256"]`` is the profile's digest: the sha256 of its
layout (every other metadata entry and each tensor's name, dtype, shape and offsets, as
canonical JSON) followed by its tensor data. Opening a profile recomputes it and refuses a
profile that does not match (modified or corrupt) or has none (written before digests);
then every field is checked. A digest is no signature: whoever can write the profile can
recompute it, so a profile is trusted input, and ``--profile-sha256`` pins the one
expected.

A profile built with ``--max-t T`` scores modules with t = T exactly as the base does (the
same Ω, power iterations and arithmetic); a smaller t uses the leading columns of the
wider sketch, which is at least as accurate. Weights stored transposed (GPT-2 Conv1D) are
scored with the right basis, which the base scan computes from W0ᵀ with another test
matrix: equal within the range finder's accuracy, not to rounding.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ._version import __version__
from .errors import InputError, UsageError
from .io.convert import widen
from .io.index import TensorIndex
from .io.jsonfile import parse_json
from .io.reader import FLOAT_DTYPES, SafetensorsFile, TensorInfo, sha256
from .io.writer import SafetensorsEntry, literal, safetensors_header, write_atomic_stream
from .options import (DEFAULT_KRYLOV_ITERS, DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, DEFAULT_SKETCH, OptionError,
                      ScanOptions)
from .profile_check import (DIGEST_KEY, META_KEY, PROFILE_VERSION, check_tensors, checked_meta, layout,
                            verified_digest)
from .profile_ritz import packed, specs, unpacked
from .sketch import Sketch, dominant_subspace

__all__ = ["Profile", "build_profile", "is_profile", "profile_keys", "sketch_weight", "write_profile", "SUFFIX",
           "DEFAULT_EXCLUDE"]

SUFFIX = ".ddiprofile"
DEFAULT_EXCLUDE = ("*embed*", "*wte*", "*wpe*", "*lm_head*", "*norm*", "*ln_*")


def is_profile(path) -> bool:
    """Whether ``path`` names a base profile (by its suffix)."""
    return Path(path).suffix == SUFFIX and Path(path).is_file()


class Profile:
    """A base profile opened for scoring; offers the key listing a TensorIndex offers."""

    def __init__(self, path, *, sha256: str | None = None):
        """Open and verify the profile at ``path`` (see the module docstring); ``sha256``,
        when given, is the digest it must have (``--profile-sha256``)."""
        self.path = Path(path)
        self.file = SafetensorsFile(self.path)
        metadata = self.file.metadata or {}
        try:
            self.meta = parse_json(metadata[META_KEY], f"the {META_KEY!r} metadata of a base profile", self.path)
        except (TypeError, KeyError):
            raise InputError(f"{self.path}: not a ddiscan base profile (no valid {META_KEY!r} metadata)") from None
        self.sha256 = verified_digest(self.file, metadata)
        if sha256 is not None and self.sha256 != sha256.lower():
            raise InputError(f"{self.path}: profile sha256 {self.sha256} is not the pinned {sha256}")
        self.weights, self.max_t = checked_meta(self.meta, self.path), self.meta["max_t"]
        check_tensors(self.file, self.weights, self.max_t, self.meta["version"])

    def keys(self):
        return self.weights.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.weights

    def info(self, key: str) -> TensorInfo:
        entry = self.weights[key]
        return TensorInfo(key, entry["dtype"], tuple(entry["shape"]), 0, 0)

    def norm(self, key: str) -> float:
        """‖W0‖_F as stored: NaN or Inf for a base weight that holds one (scored as not finite)."""
        return float(np.asarray(self.file.array(f"{key}:norm"))[0])

    def basis(self, key: str, *, transposed: bool, t: int) -> np.ndarray:
        """The top-t basis of W0's column space (of the stored row space if ``transposed``)."""
        if t > self.max_t:
            raise InputError(f"{literal(self.path)}: holds subspaces up to t={self.max_t}; {literal(key)} needs "
                             f"t={t} (rebuild the profile with a larger {{max_t}})", "max_t")
        side = "right" if transposed else "left"
        return np.asarray(self.file.array(f"{key}:{side}"))[:, :t]

    def error_bar(self, key: str, *, transposed: bool, t: int) -> tuple[float | None, float | None]:
        """(gap, error bar of O) of the basis :meth:`basis` returns (SPEC.md §2), as a scan of
        the base has them; (None, None) from a version 1 profile, which stores no Ritz values."""
        if self.meta["version"] < 2:
            return None, None
        stored = unpacked(*(np.asarray(self.file.array(name)) for name, _, _ in specs(key, self.max_t)))
        gap, error = stored.error_bar(t, side="right" if transposed else "left")
        return gap, 0.0 if self.meta["exact"] else error

    @property
    def parameters(self) -> dict:
        # profiles written before the block Krylov kernel were all built by subspace iteration
        return {"sketch": "subspace", "krylov_iters": 0,
                **{k: self.meta[k] for k in ("oversample", "sketch", "krylov_iters", "power_iters", "seed", "exact")
                   if k in self.meta}}

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "files": [{"path": str(self.path), "size": self.path.stat().st_size}],
            "profile": {"max_t": self.max_t, **self.parameters, "base_files": self.meta["base_files"],
                        "sha256": self.sha256},
        }

    def vouches_for(self) -> str:
        """What the profile says it was built from: each base file's name and sha256."""
        return ", ".join(f"{f['name']} (sha256 {f['sha256']})" for f in self.meta["base_files"])


def _selected(index: TensorIndex, include, exclude) -> list[str]:
    keys = []
    for key in sorted(index.keys()):
        info = index.info(key)
        if not key.endswith(".weight") or len(info.shape) < 2 or info.dtype not in FLOAT_DTYPES:
            continue
        if include and not any(fnmatch.fnmatchcase(key, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(key, p) for p in exclude):
            continue
        keys.append(key)
    return keys


def build_profile(base, output, *, max_t: int = 64, include=(), exclude=DEFAULT_EXCLUDE,
                  oversample: int = DEFAULT_OVERSAMPLE, sketch: str = DEFAULT_SKETCH,
                  krylov_iters: int = DEFAULT_KRYLOV_ITERS, power_iters: int = DEFAULT_POWER_ITERS, seed: int = 0,
                  exact: bool = False, force: bool = False, progress: bool = False) -> dict:
    """Write the profile of ``base`` to ``output``; return a summary.

    Parameters
    ----------
    base : path-like
        Anything a base may be (file, sharded checkpoint, directory).
    output : path-like
        The ``.ddiprofile`` file, written atomically.
    max_t : int, default 64
        Widest subspace stored; any t ≤ max_t can be scored.
    include, exclude : sequence of str
        fnmatch patterns on tensor keys; by default every 2-D (or convolution) float
        ``.weight`` except embeddings, the LM head and norms.
    oversample, sketch, krylov_iters, power_iters, seed, exact
        The sketch, as for :func:`ddiscan.scan`; the profile records them.
    """
    if max_t < 1:
        raise OptionError("{max_t} must be at least 1", "max_t")
    if Path(output).suffix != SUFFIX:
        raise UsageError(f"{output}: a profile's name must end in {SUFFIX}")
    from .sources.gguf import open_weights  # (ddiscan.sources imports this module)

    ScanOptions(oversample=oversample, sketch=sketch, krylov_iters=krylov_iters, power_iters=power_iters)  # checks
    sketcher = Sketch(oversample=oversample, power_iters=power_iters, seed=seed, exact=exact, kernel=sketch,
                      krylov_iters=krylov_iters)
    index = open_weights(base, sketcher)
    keys = profile_keys(index, include, exclude)
    bar = tqdm(total=len(keys), desc="profiling", unit="weight", disable=not progress)
    with bar:
        return write_profile(index, output, keys, max_t, sketcher, _Sketched(index, max_t, sketcher, bar),
                             force=force)


def profile_keys(index: TensorIndex, include=(), exclude=DEFAULT_EXCLUDE) -> list[str]:
    """The base weights a profile of ``index`` holds (see :func:`build_profile`)."""
    keys = _selected(index, tuple(include), tuple(exclude))
    if not keys:
        raise InputError(f"{index.path}: no weight matches the profile's include/exclude patterns")
    return keys


def write_profile(index: TensorIndex, output, keys, max_t: int, sketch: Sketch, sketched, *,
                  force: bool = False) -> dict:
    """Write the profile of ``keys`` to ``output``, each weight's arrays from
    ``sketched(key)`` (what :func:`sketch_weight` returns), asked in ``keys``' order when
    the writer reaches the weight; return a summary."""
    weights, entries = _layout(index, keys, max_t, sketched)
    meta = {
        "version": PROFILE_VERSION, "ddiscan_version": __version__, "max_t": max_t,
        "oversample": sketch.oversample, "sketch": sketch.kernel, "krylov_iters": sketch.krylov_iters,
        "power_iters": sketch.power_iters, "seed": sketch.seed, "exact": sketch.exact, "weights": weights,
        "base_files": [{"name": p.name, "size": p.stat().st_size, "sha256": sha256(p)} for p in index.files],
    }
    _write_profile(output, entries, {META_KEY: json.dumps(meta, sort_keys=True), "format": "ddiscan-profile"},
                   force=force)
    size = Path(output).stat().st_size
    base_size = sum(p.stat().st_size for p in index.files)
    return {"weights": len(keys), "size": size, "base_size": base_size}


def sketch_weight(index: TensorIndex, key: str, max_t: int, sketch: Sketch) -> dict:
    """What a profile stores for ``key``: the left and right bases (up to ``max_t``
    columns), the norm and what the error bar needs (:mod:`ddiscan.profile_ritz`), as arrays."""
    dtype = np.float64 if sketch.exact else np.float32
    w0, norm = widen(index.mapped(key), dtype, encoding=index.info(key).dtype)
    w0 = w0.reshape(w0.shape[0], -1)
    t = min(max_t, *w0.shape)
    if not math.isfinite(norm):  # NaN/Inf: scans against the profile mark it non-finite
        left, right, ritz = np.zeros((w0.shape[0], t)), np.zeros((w0.shape[1], t)), None
    else:
        ritz, _ = dominant_subspace(w0, t=t, sketch=sketch, xp=np, right=True)
        left, right = ritz.left, ritz.right
    return {"left": left, "right": right, "norm": np.array([norm]),
            **packed(ritz, t, complete=t == min(w0.shape))}


class _Sketched:
    """Each weight's bases and norm, computed once, when the writer reaches its first
    entry; the previous weight's arrays are dropped then (they are written)."""

    def __init__(self, index: TensorIndex, max_t: int, sketch: Sketch, bar):
        self.index, self.max_t, self.sketch, self.bar = index, max_t, sketch, bar
        self.computed: dict[str, dict] = {}

    def __call__(self, key: str) -> dict:
        if key not in self.computed:
            self.computed.clear()
            self.computed[key] = sketch_weight(self.index, key, self.max_t, self.sketch)
            self.bar.update()
        return self.computed[key]



def _part(sketched, key: str, name: str, dtype: str):
    return lambda: iter([np.ascontiguousarray(sketched(key)[name], dtype=dtype).tobytes()])


def _layout(index: TensorIndex, keys, max_t: int, sketched) -> tuple[dict, list[SafetensorsEntry]]:
    """The profile's weight listing and its tensors (left and right bases, norm, Ritz values) per key."""
    weights, entries = {}, []
    for key in keys:
        info = index.info(key)
        rows, cols = info.shape[0], int(np.prod(info.shape[1:]))
        t = min(max_t, rows, cols)
        weights[key] = {"shape": list(info.shape), "dtype": info.dtype}
        quantization = index.quantization(key) if hasattr(index, "quantization") else None
        if quantization is not None:  # how W0 was dequantized, for the rows of scans against the profile
            weights[key]["quantization"] = quantization
        entries += [
            SafetensorsEntry(f"{key}:left", "F32", (rows, t), rows * t * 4, _part(sketched, key, "left", "<f4")),
            SafetensorsEntry(f"{key}:right", "F32", (cols, t), cols * t * 4, _part(sketched, key, "right", "<f4")),
            SafetensorsEntry(f"{key}:norm", "F64", (1,), 8, _part(sketched, key, "norm", "<f8")),
        ]
        entries += [SafetensorsEntry(name, dtype, shape, 8 * shape[0],
                                     _part(sketched, key, name.rsplit(":", 1)[1], {"F64": "<f8", "I64": "<i8"}[dtype]))
                    for name, dtype, shape in specs(key, t)]
    return weights, entries


def _write_profile(output, entries: list[SafetensorsEntry], metadata: dict, *, force: bool) -> None:
    """Stream the profile to ``output`` atomically, its digest (:func:`~ddiscan.profile_check.verified_digest`)
    hashed while the tensors are written and put in the header's place for it at the end."""
    placeholder = "0" * 64
    header = safetensors_header(entries, {**metadata, DIGEST_KEY: placeholder})
    needle = f'"{DIGEST_KEY}":"{placeholder}"'.encode()
    at = header.index(needle) + len(DIGEST_KEY) + 4
    tensors, offset = [], 0
    for e in entries:
        tensors.append((e.name, e.dtype, e.shape, offset, offset + e.nbytes))
        offset += e.nbytes

    def fill(f):
        f.write(header)
        digest = hashlib.sha256(layout(metadata, tensors))
        for e in entries:
            for chunk in e.chunks():
                f.write(chunk)
                digest.update(chunk)
        f.seek(at)
        f.write(digest.hexdigest().encode("ascii"))
        f.seek(0, 2)

    write_atomic_stream(output, fill, force=force)
