"""float8 weights with scales (e4m3fn or e5m2; the values decoded by ``ddiscan/io/dtypes.py``).

* ``fp8-block``: transformers' ``FineGrainedFP8Config`` (DeepSeek-V3, Qwen3-FP8):
  ``<stem>.weight`` float8 (out, in) and ``<stem>.weight_scale_inv`` float32 with one scale
  per ``weight_block_size`` block (default 128 × 128), ``(ceil(out/bo), ceil(in/bi))``, edge
  blocks partial: W[i, j] = q[i, j] · scale_inv[i // bo, j // bi] (the ``weight_scale_inv``
  name notwithstanding, it multiplies: transformers' ``FP8Linear`` and DeepSeek's
  ``weight_dequant``). compressed-tensors' ``block`` strategy stores the same as
  ``weight_scale`` with the block in ``block_structure``.
* ``fp8-channel`` / ``fp8-tensor``: compressed-tensors' ``float-quantized`` (strategy
  ``channel`` or ``tensor``) and FBGEMM's rowwise float8 (``FbgemmFp8Config``):
  ``<stem>.weight_scale`` with one scale per row ((out, 1) or (out,)) or one in all:
  W = q · scale (compressed-tensors' ``dequantize``: ``x_q * scale``). An ``input_scale``
  beside it scales activations, not W0, and is not read.
"""

from __future__ import annotations

import numpy as np

from ..errors import QuantizedBase, printable
from .quant import QuantScheme

__all__ = ["SCHEMES"]


def _fail(role: str, message: str):
    raise QuantizedBase(f"{printable(role)}: {message}")


def _with_input_scale(stem: str, keys, found: dict) -> dict:
    if stem + ".input_scale" in keys:
        found["input_scale"] = stem + ".input_scale"
    return found


def _block_parts(stem: str, keys) -> dict[str, str] | None:
    weight = stem + ".weight"
    scale = next((stem + s for s in (".weight_scale_inv", ".weight_scale") if stem + s in keys), None)
    if scale is None or weight not in keys:
        return None
    return _with_input_scale(stem, keys, {"weight": weight, "scale": scale})


def _scaled_parts(stem: str, keys) -> dict[str, str] | None:
    weight, scale = stem + ".weight", stem + ".weight_scale"
    if scale not in keys or weight not in keys:
        return None
    return _with_input_scale(stem, keys, {"weight": weight, "scale": scale})


def block_size(meta: dict) -> tuple[int, int]:
    """The (rows, columns) of a scale block: ``weight_block_size`` (transformers' fp8),
    a config group's ``block_structure`` (compressed-tensors), else 128 × 128."""
    size = meta.get("weight_block_size")
    for group in (meta.get("config_groups") or {}).values():
        weights = group.get("weights") if isinstance(group, dict) else None
        if isinstance(weights, dict) and weights.get("block_structure"):
            size = weights["block_structure"]
    size = [128, 128] if size is None else size
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size)):
        _fail("weight_block_size", f"{printable(repr(size))} in quantization_config, expected [rows, columns]")
    return int(size[0]), int(size[1])


def _weight(arrays: dict) -> np.ndarray:
    weight = np.asarray(arrays["weight"])
    if weight.ndim != 2 or weight.dtype.kind != "f":
        _fail("weight", f"{weight.dtype} of shape {list(weight.shape)}, expected a float8 (out, in) matrix")
    return weight


def _values(weight: np.ndarray, dtype) -> np.ndarray:
    """The weight's values in ``dtype`` to scale in place: the decoded float8 array itself
    when it is already ``dtype`` and its own (read_parts decodes float8 into a new array)."""
    private = weight.dtype == dtype and weight.flags.writeable and weight.flags.owndata
    return weight if private else weight.astype(dtype)


def _scale(arrays: dict, shape: tuple, what: str) -> np.ndarray:
    scale = np.asarray(arrays["scale"])
    if scale.dtype.kind != "f" or scale.size != int(np.prod(shape)):
        _fail("scale", f"{scale.dtype} of shape {list(scale.shape)}, expected {list(shape)} ({what})")
    return scale.reshape(shape)


def _dequantize_block(arrays: dict, *, meta: dict, dtype) -> np.ndarray:
    weight = _weight(arrays)
    (out, inner), (bo, bi) = weight.shape, block_size(meta)
    blocks = (-(-out // bo), -(-inner // bi))
    scale = _scale(arrays, blocks, f"one scale per {bo}×{bi} block of a {out}×{inner} weight").astype(dtype)
    # each row of blocks' scales spread over the columns (blocks_o × in: small), then whole
    # bands of bo rows by broadcasting (a view: leading rows are contiguous), then the edge band
    columns = np.repeat(scale, bi, axis=1)[:, :inner]
    w = _values(weight, dtype)
    full = out - out % bo
    bands = w[:full].reshape(full // bo, bo, inner)
    bands *= columns[:full // bo, None, :]
    if full < out:
        edge = w[full:]
        edge *= columns[-1]
    return w


def _dequantize_scaled(arrays: dict, *, meta: dict, dtype) -> np.ndarray:
    weight = _weight(arrays)
    size = np.asarray(arrays["scale"]).size
    shape = (1, 1) if size == 1 else (weight.shape[0], 1)
    scale = _scale(arrays, shape, f"one scale per row of a {weight.shape[0]}-row weight, or one in all")
    w = _values(weight, dtype)
    w *= scale.astype(dtype)
    return w


def _scaled_state(arrays: dict) -> dict:
    return {"per": "tensor" if np.asarray(arrays["scale"]).size == 1 else "channel"}


SCHEMES = (
    QuantScheme("fp8-block", _block_parts, _dequantize_block,
                lambda meta: {"format": "fp8-block", "block_size": list(block_size(meta))},
                shape=lambda arrays, meta: tuple(arrays["weight"].shape)),
    *(QuantScheme(name, _scaled_parts, _dequantize_scaled, lambda meta: {"format": f"fp8-{meta['per']}"},
                  shape=lambda arrays, meta: tuple(arrays["weight"].shape), state=_scaled_state)
      for name in ("fp8-channel", "fp8-tensor")),
)
