"""Quantized base weights: the dequantizer contract, the registry, and how a checkpoint's
config picks its scheme.

A quantized checkpoint stores, in place of a module's ``<stem>.weight``, a few tensors
(packed codes, scales, zero points, a state blob) that a scheme turns back into W0. Each
family of schemes is one module under ``ddiscan/io/`` of pure NumPy kernels (no torch, no
bitsandbytes at run time) that exposes a tuple ``SCHEMES`` of :class:`QuantScheme`:

* ``parts(stem, keys)``: the tensor keys the scheme needs for the weight of ``stem``
  (``"model.layers.0.self_attn.q_proj"``), by role (``{"qweight": ..., "scales": ...}``),
  or None when ``stem`` is not stored in this scheme (``keys``: every key of the checkpoint);
* ``dequantize(arrays, *, meta, dtype)``: W0 as an ``(out, in)`` array of ``dtype``, from the
  stored tensors by role (as :func:`read_parts` gives them) and ``meta``, the checkpoint's
  quantization config (:func:`select`). It validates every shape and size against ``meta``
  and raises :class:`~ddiscan.errors.QuantizedBase` with a one-line message naming the key
  or role and what was expected; it is vectorised (no Python loop over blocks or groups);
* ``describe(meta)``: the report's ``"quantization"`` entry for a module stored this way,
  e.g. ``{"format": "bnb-nf4", "block_size": 64, "double_quant": True}``;
* ``shape(arrays, meta)`` (optional): W0's ``(out, in)`` without dequantizing, from the
  same tensors *mapped* (nothing decoded); a scheme without it is dequantized once to learn
  the shape;
* ``state(arrays)`` (optional): parameters one weight stores in its own tensors (from the
  mapped tensors: bitsandbytes' quant_state blob), merged over ``meta`` before ``shape``,
  ``dequantize`` and ``describe`` see it;
* ``settings(config, stem)`` (optional): the part of the quantization config that applies
  to the weight of ``stem`` (compressed-tensors' config group, mlx-lm's per-layer entry);
  without it every weight sees the whole config.

:func:`select` reads ``config.json``'s ``quantization_config`` (or MLX's ``quantization``)
and returns the schemes its method allows with their meta; :func:`find` picks, for one
stem, the first of them whose ``parts`` holds it. A method that no registered scheme
decodes is refused, naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection

import numpy as np
import regex

from ..errors import QuantizedBase, printable

__all__ = ["QuantScheme", "SCHEMES", "METHODS", "FORMATS", "DESCRIPTION_FIELDS", "quantization_config", "select",
           "find", "read_parts", "ct_settings"]


@dataclass(frozen=True)
class QuantScheme:
    """One storage scheme of quantized weights (see the module docstring for each field)."""

    name: str
    parts: Callable[[str, Collection[str]], dict[str, str] | None]
    dequantize: Callable[..., np.ndarray]
    describe: Callable[[dict], dict]
    shape: Callable[[dict, dict], tuple[int, int]] | None = None
    state: Callable[[dict], dict] | None = None
    settings: Callable[[dict, str], dict] | None = None


# every scheme's name, the report's quantization.format (report.schema.json lists the same)
FORMATS = ("bnb-nf4", "bnb-fp4", "bnb-int8", "fp8-block", "fp8-tensor", "fp8-channel", "gptq", "awq", "ct-pack",
           "mlx-affine", "gguf")
# the fields a ``describe`` entry may carry besides ``format``, and the JSON types of each
# (report.schema.json lists the same; a profile's recorded entries are checked against it)
DESCRIPTION_FIELDS = {
    "block_size": ("integer", "array"), "double_quant": ("boolean",), "bits": ("integer", "null"),
    "group_size": ("integer", "null"), "act_order": ("boolean",), "checkpoint_format": ("string",),
    "strategy": ("string",), "symmetric": ("boolean",), "version": ("string",), "type": ("string",),
}
# the schemes each quant_method (transformers' quantization_config) may store its weights
# in, tried in this order for each weight; "mlx" stands for MLX's ``quantization`` key
METHODS = {
    "bitsandbytes": ("bnb-nf4", "bnb-fp4", "bnb-int8"),
    "fp8": ("fp8-block",),  # transformers' FineGrainedFP8Config (DeepSeek-V3, Qwen3-FP8)
    "fbgemm_fp8": ("fp8-channel",),  # FBGEMM's rowwise float8
    "compressed-tensors": ("ct-pack",),  # its float-quantized format: _compressed_tensors
    "gptq": ("gptq",),
    "awq": ("awq",),
    "mlx": ("mlx-affine",),
}
# bitsandbytes' flags (BitsAndBytesConfig.to_dict writes the underscored ones; older
# configs the plain ones): with none set, the weights were saved unquantized.
_BNB_FLAGS = ("load_in_4bit", "load_in_8bit", "_load_in_4bit", "_load_in_8bit")


def quantization_config(config: dict) -> dict | None:
    """The quantization settings of a model ``config.json``: its ``quantization_config``
    (a bitsandbytes one with ``quant_method`` filled in when older configs lack it), or MLX's
    ``quantization`` (``group_size``, ``bits``) as ``{"quant_method": "mlx", ...}``; None
    when it declares none, or a bitsandbytes config that loads nothing in 4 or 8 bits. A
    value that is not an object is returned as it is (:func:`select` refuses it)."""
    quant = config.get("quantization_config")
    mlx = config.get("quantization")
    if isinstance(mlx, dict) and (not isinstance(quant, dict) or "quant_method" not in quant):
        return {**mlx, "quant_method": "mlx"}
    if not isinstance(quant, dict):
        return quant
    if quant.get("quant_method", "bitsandbytes") == "bitsandbytes" and any(flag in quant for flag in _BNB_FLAGS):
        if not any(quant.get(flag) for flag in _BNB_FLAGS):
            return None
        return {**quant, "quant_method": "bitsandbytes"}
    return quant


def scheme_label(quant) -> str:
    """How a message names the scheme of a ``quantization_config``."""
    if not isinstance(quant, dict):
        return "an unreadable scheme (quantization_config is not an object)"
    method = quant.get("quant_method")
    if method == "bitsandbytes":
        return f"bitsandbytes ({'4' if quant.get('load_in_4bit') or quant.get('_load_in_4bit') else '8'}-bit)"
    return str(method) if method else "an unnamed scheme (quantization_config has no quant_method)"


def _compressed_tensors(quant: dict) -> tuple[str, ...] | None:
    """compressed-tensors' float-quantized format: float8 weights with scales, per block,
    channel or tensor as its config groups' ``strategy`` says."""
    if quant.get("format") != "float-quantized":
        return METHODS["compressed-tensors"] if quant.get("format") == "pack-quantized" else None
    groups = quant.get("config_groups") if isinstance(quant.get("config_groups"), dict) else {}
    strategies = {(g.get("weights") or {}).get("strategy") for g in groups.values() if isinstance(g, dict)}
    return ("fp8-block",) if "block" in strategies else ("fp8-channel", "fp8-tensor")


def select(config: dict) -> tuple[tuple[QuantScheme, ...], dict] | None:
    """The schemes a model config's quantization allows, with their meta (the config's
    quantization settings, :func:`quantization_config`); None for an unquantized model.
    Raises QuantizedBase for a method no registered scheme decodes."""
    quant = quantization_config(config)
    if quant is None:
        return None
    registry = {scheme.name: scheme for scheme in SCHEMES}
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    method = method if isinstance(method, str) else None
    names = _compressed_tensors(quant) if method == "compressed-tensors" else METHODS.get(method)
    schemes = tuple(registry[name] for name in names or () if name in registry)
    if not schemes:
        raise QuantizedBase(f"quantized with {scheme_label(quant)}")
    return schemes, quant


def find(stem: str, keys: Collection[str], schemes) -> tuple[QuantScheme, dict[str, str]] | None:
    """The first of ``schemes`` that stores the weight of ``stem``, and its parts by role."""
    for scheme in schemes:
        parts = scheme.parts(stem, keys)
        if parts is not None:
            return scheme, parts
    return None


def read_parts(index, parts: dict[str, str], *, mapped: bool = False) -> dict[str, np.ndarray]:
    """The tensors of ``parts`` from ``index`` (a TensorIndex), by role: memory maps in their
    stored dtype (uint8, int8, int32, uint32, float16, float32, ...), bfloat16 and float8
    decoded to float32 (exact); with ``mapped``, bfloat16/float8 as their stored bits."""
    read = index.mapped if mapped else index.array
    return {role: read(key) for role, key in parts.items()}


# a target pattern from the file is matched with a timeout (as rank_pattern is, ddiscan.scaling)
_TARGET_TIMEOUT_S = 0.5


def _targets(group: dict, stem: str) -> bool:
    """Whether a compressed-tensors config group's ``targets`` name module ``stem``: a layer
    type (``Linear``: every packed weight is one), the module's name or its last part, or
    ``re:<pattern>`` matched against the name."""
    for target in group.get("targets") or ():
        if not isinstance(target, str):
            continue
        if target == "Linear" or target in (stem, stem.rsplit(".", 1)[-1]):
            return True
        if target.startswith("re:"):
            try:
                if regex.match(target[3:], stem, timeout=_TARGET_TIMEOUT_S):
                    return True
            except (regex.error, TimeoutError):
                raise QuantizedBase(f"quantization_config targets: {printable(target)} is not a usable "
                                    "pattern") from None
    return False


def ct_settings(config: dict, stem: str) -> dict:
    """The weights' quantization args of the one config group that targets ``stem``."""
    groups = config.get("config_groups")
    groups = [g for g in (groups.values() if isinstance(groups, dict) else ()) if isinstance(g, dict)]
    matching = [g for g in groups if _targets(g, stem)] if len(groups) > 1 else groups
    weights = [g.get("weights") for g in matching]
    if len(weights) != 1 or not isinstance(weights[0], dict):
        raise QuantizedBase(f"quantization_config config_groups: {len(matching)} groups with weights args target "
                            f"{printable(stem)}; expected exactly one")
    return weights[0]


# the registry: every family module's SCHEMES (they import QuantScheme from here, so they
# are imported once it is defined)
from . import bnb, fp8, intquant, mlxquant  # noqa: E402

SCHEMES: tuple[QuantScheme, ...] = (*bnb.SCHEMES, *fp8.SCHEMES, *intquant.SCHEMES, *mlxquant.SCHEMES)
