"""bitsandbytes' 4-bit (NF4, FP4, with or without double quantization) and 8-bit (LLM.int8)
weights, dequantized in NumPy as bitsandbytes dequantizes them.

The layout is what transformers' ``save_pretrained`` writes for ``Params4bit`` /
``Int8Params`` (bitsandbytes ``QuantState.as_dict(packed=True)``, ``functional.py``):

* 4-bit: ``<stem>.weight`` holds two codes a byte, the first in the high nibble, flattened
  over W's row-major elements (``uint8``, ``(ceil(n/2), 1)``); ``.weight.absmax`` one scale
  per block of ``blocksize`` elements (the last block may be partial); ``.weight.quant_map``
  the 16-value code; ``.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``) a JSON object
  stored as ``uint8`` bytes: ``quant_type``, ``blocksize``, ``dtype``, ``shape`` and, with
  double quantization, ``nested_blocksize``, ``nested_dtype``, ``nested_offset``. Then
  ``absmax`` is itself ``uint8`` codes of ``.weight.nested_quant_map`` (256 values) scaled
  per block of ``nested_blocksize`` by ``.weight.nested_absmax``, plus ``nested_offset``.
  W = code[q] · absmax[block] (bitsandbytes ``dequantize_4bit``; its kernels use the built-in
  NF4/FP4 table, which the stored ``quant_map`` must equal).
* 8-bit: ``<stem>.weight`` ``int8`` (out, in), ``<stem>.SCB`` one float32 scale per row, and
  ``<stem>.weight_format`` (0: "row", the only layout bitsandbytes saves):
  W = int8 · SCB / 127 (``int8_vectorwise_dequant``).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import QuantizedBase, printable
from .jsonfile import parse_json
from .quant import QuantScheme

__all__ = ["SCHEMES", "CODES"]

# bitsandbytes.functional.get_4bit_type: NF4 as listed, FP4 as listed divided by its largest
CODES = {
    "nf4": np.array([
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0], np.float32),
    "fp4": np.array([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
                    np.float32) / np.float32(12.0),
}
_STATE = ".weight.quant_state.bitsandbytes__"
_INT8_FORMATS = {0: "row"}  # bitsandbytes.utils.LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING, the ones saved


def _fail(key: str, message: str):
    raise QuantizedBase(f"{printable(key)}: {message}")


def _four_bit_parts(quant_type: str):
    def parts(stem: str, keys) -> dict[str, str] | None:
        state = stem + _STATE + quant_type
        if state not in keys:
            return None
        found = {"weight": stem + ".weight", "absmax": stem + ".weight.absmax",
                 "quant_map": stem + ".weight.quant_map", "quant_state": state}
        for role, key in found.items():
            if key not in keys:
                _fail(key, f"missing: a bitsandbytes {quant_type} weight stores it beside {printable(state)}")
        nested = [stem + ".weight.nested_absmax", stem + ".weight.nested_quant_map"]
        present = [key in keys for key in nested]
        if any(present) and not all(present):
            _fail(nested[present.index(False)], "missing: double quantization stores nested_absmax and nested_quant_map")
        if all(present):
            found.update(nested_absmax=nested[0], nested_quant_map=nested[1])
        return found
    return parts


def _int(value, key: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(key, f"quant_state {field} is {printable(repr(value))}, expected a positive integer")
    return value


def _four_bit_state(quant_type: str):
    def state(arrays: dict) -> dict:
        key = "quant_state"
        blob = np.asarray(arrays[key])
        if blob.dtype != np.uint8:
            _fail(key, f"{blob.dtype}, expected the uint8 bytes of a JSON object")
        data = parse_json(blob.tobytes(), "a bitsandbytes quant_state", key, error=QuantizedBase)
        if not isinstance(data, dict):
            _fail(key, "the bitsandbytes quant_state is not a JSON object")
        if data.get("quant_type") != quant_type:
            _fail(key, f"quant_state quant_type is {printable(repr(data.get('quant_type')))}, expected {quant_type!r}")
        shape = data.get("shape")
        if not isinstance(shape, list) or len(shape) != 2:
            _fail(key, f"quant_state shape is {printable(repr(shape))}, expected [out, in]")
        found = {"quant_type": quant_type, "blocksize": _int(data.get("blocksize"), key, "blocksize"),
                 "shape": tuple(_int(n, key, "shape") for n in shape)}
        if "nested_blocksize" in data or "nested_offset" in data:
            offset = data.get("nested_offset")
            if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
                _fail(key, f"quant_state nested_offset is {printable(repr(offset))}, expected a finite number")
            found.update(nested_blocksize=_int(data.get("nested_blocksize"), key, "nested_blocksize"),
                         nested_offset=float(offset))
        return found
    return state


def _expect(arrays: dict, role: str, size: int, what: str, kinds: str = "f") -> np.ndarray:
    array = np.asarray(arrays[role])
    if array.size != size or array.dtype.kind not in kinds:
        _fail(role, f"{array.dtype} of {array.size} elements, expected {size} ({what})")
    return array.reshape(-1)


def _absmax(arrays: dict, meta: dict, blocks: int) -> np.ndarray:
    """One float32 scale per block, undoing double quantization as bitsandbytes does
    (``dequantize_blockwise`` then ``+= offset``, in float32)."""
    nested = "nested_absmax" in arrays
    if nested != ("nested_offset" in meta):
        _fail("nested_absmax", "double quantization needs both the nested tensors and quant_state nested_offset")
    if not nested:
        return _expect(arrays, "absmax", blocks, f"one per block of {meta['blocksize']}").astype(np.float32)
    codes = _expect(arrays, "absmax", blocks, f"one uint8 code per block of {meta['blocksize']}", "u")
    inner = meta["nested_blocksize"]
    scales = _expect(arrays, "nested_absmax", -(-blocks // inner), f"one per {inner} absmax codes")
    table = _expect(arrays, "nested_quant_map", 256, "the 256-value nested code")
    absmax = _blockwise(np.take(table.astype(np.float32), codes), scales.astype(np.float32), inner)
    absmax += np.float32(meta["nested_offset"])
    return absmax


def _blockwise(values: np.ndarray, scales: np.ndarray, size: int) -> np.ndarray:
    """``values`` (flat) times one scale per run of ``size`` (the last run may be partial), in place."""
    full = values.size - values.size % size
    blocks = values[:full].reshape(-1, size)  # a view: the product lands in values
    blocks *= scales[:full // size, None]
    if full < values.size:
        values[full:] *= scales[-1]
    return values


def _four_bit_shape(arrays: dict, meta: dict) -> tuple[int, int]:
    """W0's shape as the quant_state says, checked against the packed weight's size."""
    out, inner = meta["shape"]
    _expect(arrays, "weight", -(-out * inner // 2), f"two 4-bit codes a byte of a {out}×{inner} weight", "u")
    return out, inner


def _dequantize_4bit(arrays: dict, *, meta: dict, dtype) -> np.ndarray:
    out, inner = meta["shape"]
    n, size = out * inner, meta["blocksize"]
    packed = _expect(arrays, "weight", -(-n // 2), f"two 4-bit codes a byte of a {out}×{inner} weight", "u")
    if packed.dtype != np.uint8:
        _fail("weight", f"packed as {packed.dtype}, expected uint8 (bnb_4bit_quant_storage other than uint8)")
    table = CODES[meta["quant_type"]]
    stored = _expect(arrays, "quant_map", 16, f"the {meta['quant_type']} code")
    if not np.allclose(stored.astype(np.float32), table, rtol=0, atol=1e-6):
        _fail("quant_map", f"does not hold bitsandbytes' {meta['quant_type']} code")
    absmax = _absmax(arrays, meta, -(-n // size))
    return _blockwise(_codes(packed, meta["quant_type"], np.dtype(dtype))[:n], absmax.astype(dtype),
                      size).reshape(out, inner)


_TABLES: dict = {}


def _tables(quant_type: str, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Lookup tables of a byte's two codes (256 × 2: high nibble first) and of two bytes'
    four codes (65536 × 4, the bytes in this machine's order when read as one uint16)."""
    if (quant_type, dtype) not in _TABLES:
        code = CODES[quant_type].astype(dtype)
        pairs = np.stack([code[np.arange(256) >> 4], code[np.arange(256) & 15]], axis=1)
        two_bytes = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
        _TABLES[quant_type, dtype] = pairs, pairs[two_bytes].reshape(-1, 4)
    return _TABLES[quant_type, dtype]


def _codes(packed: np.ndarray, quant_type: str, dtype) -> np.ndarray:
    """The values of all codes of ``packed`` in order: four a lookup (``mode="clip"``: every
    index is in range, and numpy takes unbuffered), the odd last byte two."""
    pairs, quads = _tables(quant_type, dtype)
    packed = np.ascontiguousarray(packed)
    even = packed.size - packed.size % 2
    values = np.empty(2 * packed.size, dtype)
    np.take(quads, packed[:even].view(np.uint16), axis=0, mode="clip", out=values[:2 * even].reshape(-1, 4))
    np.take(pairs, packed[even:], axis=0, mode="clip", out=values[2 * even:].reshape(-1, 2))
    return values


def _describe_4bit(quant_type: str):
    def describe(meta: dict) -> dict:
        return {"format": f"bnb-{quant_type}", "block_size": meta["blocksize"], "double_quant": "nested_offset" in meta}
    return describe


def _int8_parts(stem: str, keys) -> dict[str, str] | None:
    scb = stem + ".SCB"
    if scb not in keys:
        return None
    found = {"weight": stem + ".weight", "SCB": scb}
    if found["weight"] not in keys:
        _fail(found["weight"], f"missing: a bitsandbytes int8 weight stores it beside {printable(scb)}")
    if stem + ".weight_format" in keys:
        found["weight_format"] = stem + ".weight_format"
    return found


def _dequantize_int8(arrays: dict, *, meta: dict, dtype) -> np.ndarray:
    weight = np.asarray(arrays["weight"])
    if weight.ndim != 2 or weight.dtype != np.int8:
        _fail("weight", f"{weight.dtype} of shape {list(weight.shape)}, expected an int8 (out, in) matrix")
    scb = _expect(arrays, "SCB", weight.shape[0], "one scale per row of the weight")
    if "weight_format" in arrays:
        fmt = np.asarray(arrays["weight_format"]).reshape(-1)
        if fmt.size != 1 or int(fmt[0]) not in _INT8_FORMATS:
            _fail("weight_format", f"{printable(str(fmt.tolist()))}, expected 0 (bitsandbytes' row format)")
    dtype = np.dtype(dtype)
    out = weight.astype(dtype)
    out *= scb.astype(dtype)[:, None]
    if dtype == np.float32:
        out *= np.float32(7.874015718698502e-3)  # as bitsandbytes does: times 1/127 rounded to float32
    else:
        out /= 127
    return out


SCHEMES = (
    *(QuantScheme(f"bnb-{q}", _four_bit_parts(q), _dequantize_4bit, _describe_4bit(q),
                  shape=_four_bit_shape, state=_four_bit_state(q)) for q in ("nf4", "fp4")),
    QuantScheme("bnb-int8", _int8_parts, _dequantize_int8, lambda meta: {"format": "bnb-int8"},
                shape=lambda arrays, meta: tuple(arrays["weight"].shape)),
)
