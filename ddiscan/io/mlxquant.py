"""MLX affine quantization (``mx.quantize`` / ``mlx.nn.QuantizedLinear``, as mlx-lm saves a
quantized model), dequantized in NumPy (issue 17, item 4).

A quantized module stores ``weight`` as uint32 words, (out, in·bits/32), each row a
little-endian bit stream of ``bits``-bit integers (value i at bit i·bits, straddling words
for 3, 5 and 6 bits: :func:`ddiscan.io.intquant.unpack_bits`), and per group of
``group_size`` input columns ``scales`` and ``biases``, (out, in/group_size):
W = scales · q + biases (``mx.dequantize``, mode ``"affine"``).

``meta`` is ``config.json``'s ``"quantization"`` (``group_size``, ``bits``, ``mode``); mlx-lm
writes a module's own parameters under its path in the same object
(``"quantization": {"group_size": 64, "bits": 4, "model.layers.0.mlp.down_proj": {"group_size":
64, "bits": 8}}``) and ``false`` for a module it left unquantized: :func:`layer_meta` picks them.
"""

from __future__ import annotations

import numpy as np

from ..errors import QuantizedBase, printable
from .intquant import _expect_integer_words, _expect_shape, _meta_int, _work_dtype, unpack_bits
from .quant import QuantScheme

__all__ = ["SCHEMES", "MLX_AFFINE", "layer_meta"]

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


def layer_meta(quantization: dict, stem: str) -> dict | None:
    """A module's quantization parameters from config.json's ``"quantization"``: its own entry
    where mlx-lm wrote one (None where that is ``false``: stored unquantized), else the
    model-wide ``group_size``/``bits``/``mode``."""
    own = quantization.get(stem)
    if own is False:
        return None
    if isinstance(own, dict):
        return own
    return {name: quantization[name] for name in ("group_size", "bits", "mode") if name in quantization}


def mlx_parts(stem: str, keys):
    if f"{stem}.scales" not in keys or f"{stem}.weight" not in keys:
        return None
    if f"{stem}.biases" not in keys:
        raise QuantizedBase(f"{stem}.biases: missing; an MLX affine-quantized weight stores weight, scales, biases")
    return {role: f"{stem}.{role}" for role in ("weight", "scales", "biases")}


def mlx_dequantize(arrays: dict, *, meta: dict, dtype=np.float32) -> np.ndarray:
    """W (out, in) of an MLX affine-quantized weight (module docstring)."""
    mode = meta.get("mode", "affine")
    if mode != "affine":
        raise QuantizedBase(f"quantization mode: {mode!r}; ddiscan reads MLX's 'affine' mode only")
    bits = _meta_int(meta, "bits", BITS)
    size = _meta_int(meta, "group_size", GROUP_SIZES)
    weight = _expect_integer_words(arrays, "weight")
    out, words = weight.shape
    if (words * 32) % bits or ((words * 32) // bits) % size:
        raise QuantizedBase(f"weight: {words} words a row do not hold whole groups of {size} {bits}-bit values")
    in_features = words * 32 // bits
    why = f"{in_features // size} groups of {size} of the {in_features} input columns"
    scales = _expect_shape(arrays, "scales", (out, in_features // size), why)
    biases = _expect_shape(arrays, "biases", (out, in_features // size), why)
    work = _work_dtype(dtype)
    q = unpack_bits(weight, bits, in_features, axis=1).reshape(out, -1, size).astype(work)
    w = q * scales.astype(work)[..., None] + biases.astype(work)[..., None]
    return w.reshape(out, in_features).astype(dtype, copy=False)


def mlx_describe(meta: dict) -> dict:
    return {"format": "mlx-affine", "bits": meta.get("bits"), "group_size": meta.get("group_size")}


def mlx_shape(arrays: dict, meta: dict) -> tuple[int, int]:
    out, words = arrays["weight"].shape
    return out, words * 32 // _meta_int(meta, "bits", BITS)


def mlx_settings(config: dict, stem: str) -> dict:
    """One module's parameters (:func:`layer_meta`); a module the config says is stored
    unquantized but that has scales beside it is refused."""
    meta = layer_meta(config, stem)
    if meta is None:
        raise QuantizedBase(f"{printable(stem)}.scales: config.json's quantization says the module is not quantized, "
                            "but its weight has scales beside it")
    return meta


MLX_AFFINE = QuantScheme("mlx-affine", mlx_parts, mlx_dequantize, mlx_describe, shape=mlx_shape,
                         settings=mlx_settings)
SCHEMES = (MLX_AFFINE,)
