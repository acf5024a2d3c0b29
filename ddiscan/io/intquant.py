"""Integer group quantization: GPTQ, AWQ (GEMM) and compressed-tensors ``pack-quantized``,
dequantized in NumPy from the stored tensors (issue 17, item 3).

Every scheme stores b-bit integers q packed into 32-bit words, and per group of input
columns a scale s and a zero point z: W = s · (q − z). They differ in how they pack:

* **GPTQ** (AutoGPTQ ``qlinear_cuda_old.QuantLinear.pack``, GPTQModel): ``qweight`` is
  (in·b/32, out) int32, packed along *in*, element j of a word at bits b·j; ``qzeros``
  (groups, out·b/32) packed the same way along *out*; ``scales`` (groups, out) float16;
  ``g_idx`` (in,) the group of each input column (act-order / ``desc_act`` permutes it;
  without it, column i is in group i // group_size). Zero points: AutoGPTQ's format
  (``checkpoint_format`` ``"gptq"``, "v1") packs ``zeros - 1`` and its dequantization adds
  the 1 back after masking (``zeros = (qzeros >> shift) & mask; zeros = zeros + 1``);
  GPTQModel's ``"gptq_v2"`` stores the zeros as they are. 2, 4 and 8 bits (3-bit GPTQ
  packs across words in its own pattern and is refused).
* **AWQ GEMM** (AutoAWQ ``awq/modules/linear/gemm.py`` ``from_linear`` and
  ``awq/utils/packing_utils.py`` ``dequantize_gemm``): ``qweight`` (in, out/8) int32 packed
  along *out*, nibble i of a word holding column ``[0, 2, 4, 6, 1, 3, 5, 7][i]`` of its
  eight (``unpack_awq`` then ``reverse_awq_order`` with ``[0, 4, 1, 5, 2, 6, 3, 7]``);
  ``qzeros`` (in/group, out/8) the same; ``scales`` (in/group, out). 4 bits; zero points
  stored as they are.
* **compressed-tensors pack-quantized** (``compressors/pack_quantized``:
  ``pack_to_int32`` / ``unpack_from_int32``): ``weight_packed`` (out, ⌈in·b/32⌉) int32, each
  row a dense little-endian bit stream (value i at bit i·b, straddling words), of
  q + 2^(b−1); ``weight_scale`` (out, groups) — one column for the channel strategy;
  ``weight_zero_point`` (asymmetric only) packed the same way along *out* (dim 0);
  ``weight_shape`` the original (out, in). Dequantization (``dequantize``): s · (q − z).

``meta`` is the scheme's part of ``config.json``'s ``quantization_config``, under the names
the libraries write: GPTQ ``bits``, ``group_size``, ``desc_act``, ``checkpoint_format``;
AWQ ``bits``, ``group_size``, ``version``; compressed-tensors the weights' quantization
args ``num_bits``, ``group_size``, ``strategy``, ``symmetric`` of the config group whose
``targets`` name the module (:func:`ddiscan.io.quant.ct_settings`).
"""

from __future__ import annotations

import numpy as np

from ..errors import QuantizedBase
from .quant import QuantScheme, ct_settings

__all__ = ["unpack_bits", "SCHEMES", "GPTQ", "AWQ", "CT_PACK"]

# AutoAWQ packing_utils: nibble i of a word holds column AWQ_ORDER[i] of its eight;
# AWQ_REVERSE_ORDER (its inverse) puts them back
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def unpack_bits(words: np.ndarray, bits: int, count: int, axis: int = -1) -> np.ndarray:
    """``count`` unsigned ``bits``-bit integers along ``axis`` of 32-bit ``words``, read as a
    little-endian bit stream (value i at bit i·bits, the high part of one that straddles
    a word in the next): the packing of GPTQ, AWQ (before its column order), MLX and
    compressed-tensors. Returns int32, ``axis`` of length ``count``."""
    words = np.moveaxis(np.asarray(words), axis, -1).view(np.uint32)
    start = np.arange(count, dtype=np.int64) * bits
    word, offset = start // 32, (start % 32).astype(np.uint32)
    values = words[..., word] >> offset
    straddling = offset + bits > 32
    if straddling.any():
        padded = np.concatenate([words, np.zeros(words.shape[:-1] + (1,), np.uint32)], axis=-1)
        high = padded[..., word[straddling] + 1] << (np.uint32(32) - offset[straddling])
        values[..., straddling] |= high
    values &= np.uint32((1 << bits) - 1)
    return np.moveaxis(values.view(np.int32), -1, axis)


def _fail(role: str, what: str):
    raise QuantizedBase(f"{role}: {what}")


def _expect_shape(arrays: dict, role: str, shape: tuple, why: str) -> np.ndarray:
    array = arrays.get(role)
    if array is None:
        _fail(role, f"missing (expected shape {list(shape)}, {why})")
    if tuple(array.shape) != tuple(shape):
        _fail(role, f"has shape {list(array.shape)}; expected {list(shape)} ({why})")
    return array


def _expect_integer_words(arrays: dict, role: str) -> np.ndarray:
    array = arrays.get(role)
    if array is None:
        _fail(role, "missing (the packed 32-bit words)")
    if array.dtype not in (np.int32, np.uint32) or array.ndim != 2:
        _fail(role, f"has dtype {array.dtype} and {array.ndim} dimensions; expected a 2-d int32 tensor")
    return array


def _meta_int(meta: dict, name: str, allowed, default=None) -> int:
    value = meta.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or (allowed is not None and value not in allowed):
        choices = f"one of {sorted(allowed)}" if allowed is not None else "an integer"
        raise QuantizedBase(f"quantization_config {name}: {value!r}; expected {choices}")
    return value


def _group_size(meta: dict, in_features: int) -> int:
    size = _meta_int(meta, "group_size", None, 128)
    if size == -1:
        return in_features
    if size <= 0:
        raise QuantizedBase(f"quantization_config group_size: {size}; expected a positive size or -1")
    return size


def _work_dtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _group_index(arrays: dict, in_features: int, group_size: int, groups: int) -> np.ndarray:
    """Each input column's group: ``g_idx`` where stored (checked in range), else i // size."""
    if "g_idx" not in arrays:
        return np.arange(in_features) // group_size
    g_idx = _expect_shape(arrays, "g_idx", (in_features,), "one group per input column")
    if g_idx.dtype.kind not in "iu":
        _fail("g_idx", f"has dtype {g_idx.dtype}; expected integers")
    if in_features and (g_idx.min() < 0 or g_idx.max() >= groups):
        _fail("g_idx", f"holds groups {int(g_idx.min())}..{int(g_idx.max())}; expected 0..{groups - 1}")
    return np.asarray(g_idx, dtype=np.int64)


def _affine(q, zeros, scales, g, dtype) -> np.ndarray:
    """(out, in) W from (in, out) integers and per-group (groups, out) zeros and scales."""
    work = _work_dtype(dtype)
    w = (q - zeros[g]).astype(work) * scales[g].astype(work)
    return np.ascontiguousarray(w.T, dtype=dtype)


def _parts(stem: str, keys, present: str, needed: tuple, optional: tuple, name: str):
    if f"{stem}.{present}" not in keys:
        return None
    parts = {role: f"{stem}.{role}" for role in needed + optional if f"{stem}.{role}" in keys}
    missing = [role for role in needed if role not in parts]
    if missing:
        raise QuantizedBase(f"{stem}.{missing[0]}: missing; a {name} weight stores "
                            f"{', '.join(needed)} together")
    return parts


def gptq_parts(stem: str, keys):
    return _parts(stem, keys, "qweight", ("qweight", "qzeros", "scales"), ("g_idx",), "GPTQ")


def gptq_dequantize(arrays: dict, *, meta: dict, dtype=np.float32) -> np.ndarray:
    """W (out, in) of a GPTQ weight (module docstring)."""
    bits = _meta_int(meta, "bits", (2, 4, 8))
    pack = 32 // bits
    qweight = _expect_integer_words(arrays, "qweight")
    in_features, out = qweight.shape[0] * pack, qweight.shape[1]
    if out % pack:
        _fail("qweight", f"has {out} output columns; expected a multiple of {pack} to pack the zero points")
    size = _group_size(meta, in_features)
    groups = -(-in_features // size)
    why = f"{groups} groups of {size} input columns"
    scales = _expect_shape(arrays, "scales", (groups, out), why)
    qzeros = _expect_shape(arrays, "qzeros", (groups, out // pack), f"{why}, {bits}-bit zero points")
    _expect_integer_words(arrays, "qzeros")
    zeros = unpack_bits(qzeros, bits, out, axis=1)
    if meta.get("checkpoint_format", "gptq") != "gptq_v2":
        zeros = zeros + 1  # AutoGPTQ (v1) packs zeros - 1
    q = unpack_bits(qweight, bits, in_features, axis=0)
    return _affine(q, zeros, scales, _group_index(arrays, in_features, size, groups), dtype)


def gptq_describe(meta: dict) -> dict:
    return {"format": "gptq", "bits": meta.get("bits"), "group_size": meta.get("group_size", 128),
            "act_order": bool(meta.get("desc_act", False)),
            "checkpoint_format": meta.get("checkpoint_format", "gptq")}


def awq_parts(stem: str, keys):
    return _parts(stem, keys, "qweight", ("qweight", "qzeros", "scales"), (), "AWQ")


def awq_dequantize(arrays: dict, *, meta: dict, dtype=np.float32) -> np.ndarray:
    """W (out, in) of an AWQ GEMM weight (module docstring)."""
    _meta_int(meta, "bits", (4,), 4)
    version = str(meta.get("version", "gemm")).lower()
    if version != "gemm":
        raise QuantizedBase(f"quantization_config version: {version!r}; ddiscan reads AWQ's 'gemm' packing only")
    qweight = _expect_integer_words(arrays, "qweight")
    in_features, out = qweight.shape[0], qweight.shape[1] * 8
    size = _group_size(meta, in_features)
    if in_features % size:
        _fail("qweight", f"has {in_features} input rows; expected a multiple of group_size {size}")
    groups = in_features // size
    why = f"{groups} groups of {size} input rows"
    scales = _expect_shape(arrays, "scales", (groups, out), why)
    qzeros = _expect_shape(arrays, "qzeros", (groups, out // 8), f"{why}, 4-bit zero points")
    _expect_integer_words(arrays, "qzeros")
    order = (np.arange(out).reshape(-1, 8)[:, list(AWQ_REVERSE_ORDER)]).ravel()
    q = unpack_bits(qweight, 4, out, axis=1)[:, order]
    zeros = unpack_bits(qzeros, 4, out, axis=1)[:, order]
    return _affine(q, zeros, scales, np.arange(in_features) // size, dtype)


def awq_describe(meta: dict) -> dict:
    return {"format": "awq", "bits": meta.get("bits", 4), "group_size": meta.get("group_size", 128),
            "version": str(meta.get("version", "gemm")).lower()}


def ct_parts(stem: str, keys):
    return _parts(stem, keys, "weight_packed", ("weight_packed", "weight_scale", "weight_shape"),
                  ("weight_zero_point", "weight_g_idx"), "compressed-tensors pack-quantized")


def _ct_shape(arrays: dict, bits: int) -> tuple[int, int]:
    shape = arrays.get("weight_shape")
    if shape is None or np.asarray(shape).shape != (2,) or np.asarray(shape).dtype.kind not in "iu":
        _fail("weight_shape", "missing or not two integers; expected the weight's [out, in]")
    out, in_features = (int(v) for v in np.asarray(shape))
    _expect_integer_words(arrays, "weight_packed")
    _expect_shape(arrays, "weight_packed", (out, -(-in_features * bits // 32)),
                  f"weight_shape {[out, in_features]} packed {bits} bits")
    return out, in_features


def _ct_groups(meta: dict, in_features: int) -> int:
    strategy = meta.get("strategy", "group")
    if strategy == "group":
        return _group_size(meta, in_features)
    if strategy in ("channel", "tensor"):
        return max(in_features, 1)
    raise QuantizedBase(f"quantization_config strategy: {strategy!r}; expected 'group', 'channel' or 'tensor'")


def ct_dequantize(arrays: dict, *, meta: dict, dtype=np.float32) -> np.ndarray:
    """W (out, in) of a compressed-tensors pack-quantized weight (module docstring)."""
    bits = _meta_int(meta, "num_bits", range(1, 9))
    if "weight_g_idx" in arrays:
        _fail("weight_g_idx", "activation ordering (actorder) is not supported")
    out, in_features = _ct_shape(arrays, bits)
    size = _ct_groups(meta, in_features)
    groups = -(-in_features // size)
    rows = 1 if meta.get("strategy") == "tensor" else out
    why = f"{groups} groups of {size} input columns, strategy {meta.get('strategy', 'group')}"
    if "weight_scale" not in arrays:
        _fail("weight_scale", f"missing (expected {rows} × {groups} scales, {why})")
    scale = np.asarray(arrays["weight_scale"]).reshape(-1)
    if scale.size != rows * groups:
        _fail("weight_scale", f"has {scale.size} values; expected {rows} × {groups} ({why})")
    offset = 1 << (bits - 1)
    zeros = np.zeros((rows, groups), np.int32)
    if not meta.get("symmetric", True):
        packed = _expect_shape(arrays, "weight_zero_point", (-(-rows * bits // 32), groups),
                               f"{why}, zero points packed along the output rows")
        zeros = unpack_bits(packed, bits, rows, axis=0) - offset
    q = unpack_bits(arrays["weight_packed"], bits, in_features, axis=1) - offset
    g = np.arange(in_features) // size
    scales = np.broadcast_to(scale.reshape(rows, groups), (out, groups))
    return _affine(q.T, np.broadcast_to(zeros, (out, groups)).T, scales.T, g, dtype)


def ct_describe(meta: dict) -> dict:
    return {"format": "ct-pack", "bits": meta.get("num_bits"), "strategy": meta.get("strategy", "group"),
            "group_size": meta.get("group_size"), "symmetric": bool(meta.get("symmetric", True))}


def gptq_shape(arrays: dict, meta: dict) -> tuple[int, int]:
    qweight = arrays["qweight"]
    return qweight.shape[1], qweight.shape[0] * (32 // _meta_int(meta, "bits", (2, 4, 8)))


def awq_shape(arrays: dict, meta: dict) -> tuple[int, int]:
    qweight = arrays["qweight"]
    return qweight.shape[1] * 8, qweight.shape[0]


def ct_shape(arrays: dict, meta: dict) -> tuple[int, int]:
    return _ct_shape(arrays, _meta_int(meta, "num_bits", range(1, 9)))


GPTQ = QuantScheme("gptq", gptq_parts, gptq_dequantize, gptq_describe, shape=gptq_shape)
AWQ = QuantScheme("awq", awq_parts, awq_dequantize, awq_describe, shape=awq_shape)
CT_PACK = QuantScheme("ct-pack", ct_parts, ct_dequantize, ct_describe, shape=ct_shape, settings=ct_settings)
SCHEMES = (GPTQ, AWQ, CT_PACK)
