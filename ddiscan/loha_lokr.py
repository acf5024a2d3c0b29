"""LoHa and LoKr modules (PEFT's LoHaConfig/LoKrConfig, LyCORIS): their shapes, which core
scores them, their factors and their scaling (SPEC.md §11).

A module's tensors are gathered by :mod:`ddiscan.grammars` (``Pair.parts``: ``hada_w1_a`` …,
``lokr_w1`` … → key); the kernels are :mod:`ddiscan.structured`. Every module is returned in
``nn.Linear`` terms, ΔW of shape (d, k) = (out, in · kh · kw):

* LoHa: ΔW = s · (W1a · W1b) ⊙ (W2a · W2b), each half a plain product or PEFT's/LyCORIS's
  Tucker rebuild from ``hada_t1``/``hada_t2``; scored through its Khatri–Rao factors
  (core ``khatri-rao``, rank ≤ r²), or densely (core ``dense``) when r² > min(d, k)/4.
* LoKr: ΔW = s · W1 ⊗ W2, W1 = ``lokr_w1`` or ``lokr_w1_a · lokr_w1_b``, W2 = ``lokr_w2``,
  ``lokr_w2_a · lokr_w2_b`` or the Tucker rebuild from ``lokr_t2``; scored through its two
  factors (core ``kronecker``).

s is PEFT's ``alpha / r`` (``rank_pattern``/``alpha_pattern`` per module) or LyCORIS's
``.alpha / r`` (1 when LyCORIS keeps both Kronecker factors full) — the scale LyCORIS's
forward applies once (its ``get_diff_weight`` applies it twice; SPEC.md §11.3).
"""

from __future__ import annotations

import math

import numpy as np

from .adapter import Adapter
from .errors import InputError, ShapeMismatch
from .grammars import Pair
from .io.reader import SafetensorsFile
from .scaling import _pattern_value, _scalar, module_scale
from .spectral import thin_factors
from .structured import Kron, full_factors, khatri_rao, tucker_factors

__all__ = ["structured_shapes", "core_of", "structured_factors", "structured_scale", "CORES"]

CORES = ("lora", "khatri-rao", "kronecker", "dense")
_PEFT_TYPES = {"loha": "LOHA", "lokr": "LOKR"}


def _shape(file: SafetensorsFile, pair: Pair, part: str) -> tuple[int, ...] | None:
    key = pair.parts.get(part)
    return None if key is None else tuple(file.tensors[key].shape)


def _half_shape(file: SafetensorsFile, pair: Pair, a: str, b: str, t: str) -> tuple[int, int, int, tuple]:
    """(rows, cols, rank, spatial) of one low-rank half: ``a`` rows × r and ``b`` r × cols, or
    the Tucker form (``t`` r × r × spatial, ``a`` r × rows, ``b`` r × in; cols = in · spatial)."""
    sa, sb, st = _shape(file, pair, a), _shape(file, pair, b), _shape(file, pair, t)
    where = f"{file.path}: {pair.parts[a]} {list(sa)} / {pair.parts[b]} {list(sb)}"
    if len(sa) != 2 or len(sb) != 2:
        raise ShapeMismatch(f"{where}: {a} and {b} must be 2-D")
    if st is None:
        if sa[1] != sb[0]:
            raise ShapeMismatch(f"{where}: {a} is rows × r and {b} is r × cols, but the ranks differ")
        return sa[0], sb[1], sa[1], ()
    if len(st) < 3 or st[0] != sa[0] or st[1] != sb[0]:
        raise ShapeMismatch(f"{where} / {pair.parts[t]} {list(st)}: {t} must be r × r × kernel, "
                            f"with {a} r × out and {b} r × in")
    return sa[1], sb[1] * math.prod(st[2:]), sa[0], st[2:]


def _loha_shapes(file: SafetensorsFile, pair: Pair) -> tuple[int, int, int, str]:
    if ("hada_t1" in pair.parts) != ("hada_t2" in pair.parts):
        raise ShapeMismatch(f"{file.path}: LoHa module {pair.name} has one Tucker core of hada_t1/hada_t2")
    first = _half_shape(file, pair, "hada_w1_a", "hada_w1_b", "hada_t1")
    second = _half_shape(file, pair, "hada_w2_a", "hada_w2_b", "hada_t2")
    if first != second:
        raise ShapeMismatch(f"{file.path}: LoHa module {pair.name}: its two halves differ "
                            f"(rows, cols, rank {first[:3]} and {second[:3]})")
    d, k, r, spatial = first
    return d, k, r, "conv" if spatial else "linear"


def _kron_half(file: SafetensorsFile, pair: Pair, n: str) -> tuple[int, int, int | None, bool]:
    """(rows, cols, rank or None when full, spatial) of LoKr's W1 (n = "1") or W2 (n = "2")."""
    full = _shape(file, pair, f"lokr_w{n}")
    if full is not None:
        if f"lokr_w{n}_a" in pair.parts or f"lokr_w{n}_b" in pair.parts or (n == "2" and "lokr_t2" in pair.parts):
            raise ShapeMismatch(f"{file.path}: LoKr module {pair.name} has both lokr_w{n} and its factors")
        if len(full) < 2 or (n == "1" and len(full) != 2):
            raise ShapeMismatch(f"{file.path}: {pair.parts[f'lokr_w{n}']} is {list(full)}; lokr_w{n} must be "
                                f"{'2-D' if n == '1' else 'out × in [× kernel]'}")
        return full[0], math.prod(full[1:]), None, len(full) > 2
    rows, cols, rank, spatial = _half_shape(file, pair, f"lokr_w{n}_a", f"lokr_w{n}_b", "lokr_t2" if n == "2" else "")
    return rows, cols, rank, bool(spatial)


def _lokr_shapes(file: SafetensorsFile, pair: Pair) -> tuple[int, int, int, str]:
    a, c, r1, _ = _kron_half(file, pair, "1")
    b, e, r2, spatial = _kron_half(file, pair, "2")
    if r1 is not None and r2 is not None and r1 != r2:
        raise ShapeMismatch(f"{file.path}: LoKr module {pair.name}: lokr_w1 and lokr_w2 factors have ranks {r1}, {r2}")
    rank = r1 if r1 is not None else r2 if r2 is not None else min(a, c) * min(b, e)
    return a * b, c * e, rank, "conv" if spatial else "linear"


def structured_shapes(pair: Pair, file: SafetensorsFile) -> tuple[int, int, int, str]:
    """(d, k, r, layout) of a LoHa/LoKr module's ΔW, or ShapeMismatch. r is the module's rank
    (LoKr with both factors full: the rank bound of W1 ⊗ W2)."""
    return (_loha_shapes if pair.family == "loha" else _lokr_shapes)(file, pair)


def core_of(family: str | None, d: int, k: int, r: int) -> str:
    """Which core scores the module: LoRA's, LoHa's Khatri–Rao (dense when r² > min(d, k)/4)
    or LoKr's Kronecker."""
    if family is None:
        return "lora"
    if family == "lokr":
        return "kronecker"
    return "khatri-rao" if r * r <= min(d, k) / 4 else "dense"


def _half(arrays: dict, a: str, b: str, t: str) -> tuple[np.ndarray, np.ndarray]:
    if t in arrays:
        return tucker_factors(arrays[t], arrays[a], arrays[b], xp=np)
    return arrays[a], arrays[b].reshape(arrays[b].shape[0], -1)


def _kron(arrays: dict) -> Kron:
    w1 = full_factors(arrays["lokr_w1"], xp=np) if "lokr_w1" in arrays else (arrays["lokr_w1_a"], arrays["lokr_w1_b"])
    if "lokr_w2" in arrays:
        w2 = full_factors(arrays["lokr_w2"].reshape(arrays["lokr_w2"].shape[0], -1), xp=np)
    else:
        w2 = _half(arrays, "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    return Kron(*thin_factors(*w1), *thin_factors(*w2))


def structured_factors(module, file: SafetensorsFile, *, structured: bool = True):
    """A LoHa/LoKr module's update as float64 factors, ΔW = s · up · down (thinned), or, for
    LoKr with ``structured``, as a :class:`~ddiscan.structured.Kron`.

    LoHa's core ``khatri-rao`` gives its Khatri–Rao factors, ``dense`` the dense ΔW / s as
    (ΔW, I) or (I, ΔW); LoKr without ``structured`` the Kronecker products of its factors."""
    arrays = {part: np.asarray(file.array(key), dtype=np.float64) for part, key in module.parts}
    if module.family == "loha":
        first = _half(arrays, "hada_w1_a", "hada_w1_b", "hada_t1")
        second = _half(arrays, "hada_w2_a", "hada_w2_b", "hada_t2")
        if module.core == "khatri-rao":
            return thin_factors(*khatri_rao(*first, *second, xp=np))
        return full_factors((first[0] @ first[1]) * (second[0] @ second[1]), xp=np)
    kron = _kron(arrays)
    if structured:
        return kron
    return thin_factors(np.kron(kron.u1, kron.u2), np.kron(kron.v1, kron.v2))


def _both_full(pair: Pair) -> bool:
    return "lokr_w1" in pair.parts and "lokr_w2" in pair.parts


def structured_scale(adapter: Adapter, pair: Pair, rank: int, alpha: float | None,
                     scaling: float | None) -> tuple[float, str]:
    """``(s, where s came from)`` for a LoHa/LoKr module: the overrides as for LoRA, then
    LyCORIS's ``.alpha`` (kohya-style names) or PEFT's ``adapter_config.json``."""
    if alpha is not None or scaling is not None:
        return module_scale(adapter, pair, rank, alpha, scaling)
    if pair.style == "kohya":
        if _both_full(pair):
            return 1.0, "LyCORIS LoKr with both factors full (scale 1)"
        if pair.alpha:
            a = _scalar(adapter.file, pair.alpha)
            return a / rank, f"{pair.alpha} (alpha={a:g}/r={rank})"
        return 1.0, "default (no .alpha tensor: alpha = r)"
    return _peft_scale(adapter, pair, rank)


def _peft_scale(adapter: Adapter, pair: Pair, rank: int) -> tuple[float, str]:
    """PEFT's LoHa/LoKr: s = alpha / r, per module from rank_pattern/alpha_pattern."""
    config, source = adapter.config, adapter.config_source
    if config is None:
        return 1.0, "default (no adapter config)"
    peft_type, expected = str(config.get("peft_type")).upper(), _PEFT_TYPES[pair.family]
    if peft_type != expected:
        raise InputError(f"{source}: peft_type {config.get('peft_type')} but the adapter holds {pair.family} "
                         f"tensors ({pair.name}); its scaling would be misread")
    try:
        r = int(_pattern_value(config.get("rank_pattern"), pair.name, config["r"]))
        a = float(_pattern_value(config.get("alpha_pattern"), pair.name, config["alpha"]))
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{source}: a {expected} config needs numeric 'r' and 'alpha'") from None
    if r != rank and not _both_full(pair):
        raise ShapeMismatch(f"{source}: says r={r} for {pair.name}, but its {pair.family} tensors have rank {rank}")
    return a / r, f"{source} (alpha={a:g}/r={r})"
