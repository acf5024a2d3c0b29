"""Matching LoRA modules to base keys: the name lookups, and what the base weight must be.

A module name finds its base weight by PEFT's dotted path (either side may carry a leading
prefix the other lacks) or kohya's underscored one; an ``lm_head`` with none falls back to a
tied input embedding. The weight found must be plain floats (:func:`check_not_quantized`),
and a square one is told Linear from GPT-2 ``Conv1D`` by :func:`conv1d_evidence`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import QuantizedBase
from .grammars import KOHYA_PREFIXES, Pair
from .io.index import TensorIndex
from .io.reader import FLOAT_DTYPES

__all__ = ["BaseMatch", "BaseNames", "tied_embedding", "check_not_quantized", "conv1d_evidence"]

_CONV1D_NAMES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
# Tensors that sit beside a quantized weight (bitsandbytes 4/8-bit, FP8 checkpoints).
_QUANT_SIBLINGS = (
    ".weight.absmax", ".weight.quant_map", ".weight.nested_absmax",
    ".weight.quant_state.bitsandbytes__nf4", ".weight.quant_state.bitsandbytes__fp4",
    ".SCB", ".weight_format", ".weight_scale_inv", ".weight_scale", ".input_scale",
)


@dataclass(frozen=True)
class BaseMatch:
    """A LoRA pair and the base weight it updates: ΔW is ``d`` × ``k`` of rank ``r`` in
    ``layout``; the stored base tensor fits W0 ``as_is`` and/or ``transposed`` (both: square)."""

    pair: Pair
    base_key: str
    d: int
    k: int
    r: int
    layout: str
    as_is: bool
    transposed: bool


class BaseNames:
    """Lookup tables from LoRA module names to base weight keys."""

    def __init__(self, keys):
        self.keys = set(keys)
        self.by_suffix: dict[str, list[str]] = {}
        self.by_underscore: dict[str, list[str]] = {}
        for key in self.keys:
            if not key.endswith(".weight"):
                continue
            parts = key.split(".")
            for i in range(1, len(parts) - 1):
                self.by_suffix.setdefault(".".join(parts[i:]), []).append(key)
            stem = parts[:-1]
            for i in range(len(stem)):
                self.by_underscore.setdefault("_".join(stem[i:]), []).append(key)

    def peft(self, path: str) -> list[str]:
        target = path + ".weight"
        if target in self.keys:
            return [target]
        # the base has a leading prefix the adapter lacks
        found = set(self.by_suffix.get(target, ()))
        # the adapter has a leading prefix the base lacks (most specific first)
        parts = path.split(".")
        for i in range(1, len(parts)):
            candidate = ".".join(parts[i:]) + ".weight"
            if candidate in self.keys:
                found.add(candidate)
                break
        return sorted(found)

    def kohya(self, name: str) -> list[str]:
        for prefix in KOHYA_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        return sorted(set(self.by_underscore.get(name, ())))

_EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def tied_embedding(base: TensorIndex, lookup: BaseNames, d: int, k: int) -> list[str]:
    """Checkpoints with tied embeddings store no lm_head: its weight is the input embedding."""
    return sorted(
        key for key in lookup.keys
        if key.endswith(_EMBEDDING_NAMES) and tuple(base.info(key).shape) == (d, k)
    )


def check_not_quantized(base: TensorIndex, keys: set, base_key: str) -> None:
    stem = base_key.removesuffix(".weight")
    for suffix in _QUANT_SIBLINGS:
        if stem + suffix in keys:
            raise QuantizedBase(
                f"{base_key}: the base weight is quantized ({stem + suffix} beside it); "
                "score against the unquantized base checkpoint"
            )
    dtype = base.info(base_key).dtype
    if dtype not in FLOAT_DTYPES:
        raise QuantizedBase(f"{base_key}: base weight has dtype {dtype}, a quantized or non-float format")
    if dtype.startswith("F8_"):
        # A float8 weight with any other tensor of its module beside it (a scale, under
        # whatever name: weight_scale, weight_scale_inv, Mistral's qscale_weight, ...) holds
        # W0 / scale, not W0; only a bare float8 weight is W0 cast to float8.
        companions = sorted(
            key for key in keys
            if key != base_key and key != stem + ".bias"
            and (key.startswith(base_key + ".") or (key.startswith(stem + ".") and "." not in key[len(stem) + 1:]))
        )
        if companions:
            raise QuantizedBase(
                f"{base_key}: a {dtype} base weight with {companions[0]} beside it, a scaled (quantized) float8 "
                "weight; score against the unquantized base checkpoint"
            )


def conv1d_evidence(found: list[BaseMatch], config: dict | None) -> dict[str, bool]:
    """For square weights the shape cannot tell a GPT-2 Conv1D (stored k × d) from a Linear.

    Decide as PEFT does, by the layer's type, inferred from non-square weights of the same
    kind in the same checkpoint; failing that, of any kind; failing that, the adapter's
    ``fan_in_fan_out``, then the Conv1D layer names of GPT-2.
    """
    by_kind: dict[str, set[bool]] = {}
    for m in found:
        if m.layout == "linear" and m.as_is != m.transposed:  # embeddings and convs are never Conv1D
            by_kind.setdefault(m.base_key.rsplit(".", 2)[-2], set()).add(m.transposed)
    overall = set().union(*by_kind.values()) if by_kind else set()
    decision = {}
    for m in found:
        if not (m.as_is and m.transposed):
            continue
        base_key = m.base_key
        kind = base_key.rsplit(".", 2)[-2]
        evidence = by_kind.get(kind) if len(by_kind.get(kind, ())) == 1 else (overall if len(overall) == 1 else None)
        if evidence:
            decision[base_key] = next(iter(evidence))
        elif config is not None and "fan_in_fan_out" in config:
            decision[base_key] = bool(config["fan_in_fan_out"])
        else:
            decision[base_key] = kind in _CONV1D_NAMES
    return decision
