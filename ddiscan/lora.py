"""Adapter files → LoRA modules matched to base weights, each with its scaling.

This module puts the pieces together (:func:`match_modules`) and keeps the public names of
all of them: reading an adapter is :mod:`ddiscan.adapter`, the key grammars
:mod:`ddiscan.grammars`, the base-key lookups and checks :mod:`ddiscan.basekeys`, the
scaling :mod:`ddiscan.scaling`, LoHa and LoKr (PEFT's and LyCORIS's keys) :mod:`ddiscan.loha_lokr`.

The key layouts read (PEFT, kohya, diffusers before PEFT, MLX-LM; VeRA :mod:`ddiscan.vera`;
LoHa/LoKr :mod:`ddiscan.loha_lokr`) are listed in :mod:`ddiscan.grammars` (SPEC.md §1, §8, §9,
§11). Every other tensor that carries an update is *unread*: an error, or a counted warning
with ``allow_unmatched``, never a silent drop. Modules are in ``nn.Linear`` terms: ΔW = s · up
· down (d × r by r × k) has the base weight's scored shape (after a ``Conv1D`` transpose or a
conv flatten).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .adapter import Adapter, check_peft_type, load_adapter
from .basekeys import BaseMatch, BaseNames, check_not_quantized, conv1d_evidence, tied_embedding
from .errors import InputError, MatchError, NoLoraPairs, ShapeMismatch
from .io.writer import literal
from .factors import base_fit, check_float_factors, check_magnitude, check_singular, factor_shapes, nonempty
from .grammars import (KOHYA_PREFIXES, PEFT_PREFIX, Pair, Skipped, adapter_kind, classify, mlx_transposed, module_keys,
                       unread_summary)
from .io.index import TensorIndex
from .io.reader import SafetensorsFile
from .loha_lokr import core_of, structured_factors, structured_scale
from .scaling import module_scale
from .vera import vera_factors, vera_width

__all__ = [
    "Adapter", "LoraModule", "Skipped", "load_adapter", "match_modules", "lora_factors", "base_matrix", "orient",
    "dense_delta", "module_keys", "adapter_kind", "KOHYA_PREFIXES", "PEFT_PREFIX",
]


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-updated module, matched to its base weight.

    ``d, k`` is the scored shape of W0 and ΔW; ``r`` the update's rank; ``scale`` the
    factor s of ΔW = s · up · down and ``scale_source`` where it came from.
    """

    name: str
    base_key: str
    up_key: str
    down_key: str
    layout: str  # "linear", "embedding" or "conv"
    d: int
    k: int
    r: int
    scale: float
    scale_source: str
    transpose_base: bool = False
    dora_key: str | None = None
    alpha_key: str | None = None
    singular_key: str | None = None  # AdaLoRA's lora_E, folded into down
    bias_key: str | None = None  # PEFT's lora_B.bias (lora_bias=True)
    transpose_factors: bool = False  # MLX-LM: the file holds upᵀ and downᵀ
    vera: bool = False  # VeRA: up_key is lambda_b, down_key lambda_d (ddiscan.vera)
    family: str | None = None  # "loha" or "lokr": the update is in ``parts`` (up_key/down_key are None)
    parts: tuple[tuple[str, str], ...] = ()  # LoHa/LoKr part (hada_w1_a …) and its key
    core: str = "lora"  # what scores ΔW: loha_lokr.CORES

    @property
    def kind(self) -> str:
        return self.base_key.removesuffix(".weight").rsplit(".", 1)[-1]

    @property
    def block(self) -> int | None:
        for part in self.base_key.split("."):
            if part.isdigit():
                return int(part)
        return None

    @property
    def adapter_keys(self) -> tuple[str, ...]:
        keys = (self.down_key, self.up_key, self.singular_key, self.bias_key, *(k for _, k in self.parts),
                self.dora_key, self.alpha_key)
        return tuple(k for k in keys if k)


# ---------------------------------------------------------------------------------------
# Putting it together


@dataclass
class _Findings:
    """What matching says beside the modules: tensors passed over, warnings, LoRA pairs
    with no base weight (by their down key)."""

    skipped: list[Skipped]
    warnings: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)


def match_modules(
    adapter: Adapter,
    base: TensorIndex,
    *,
    alpha: float | None = None,
    scaling: float | None = None,
    allow_unmatched: bool = False,
) -> tuple[list[LoraModule], list[Skipped], list[str]]:
    """Find every LoRA pair in ``adapter`` and the base weight it updates.

    Parameters
    ----------
    adapter : Adapter
    base : TensorIndex
    alpha, scaling : float, optional
        Override the scaling: ``s = alpha / r`` or ``s = scaling`` for every module.
    allow_unmatched : bool, default False
        Report LoRA pairs with no base weight, and adapter tensors with an update ddiscan
        cannot read (non-LoRA methods, unknown LoRA layouts), as warnings instead of an error.

    Returns
    -------
    modules : list of LoraModule, sorted by name
    skipped : list of Skipped, the adapter tensors that are not LoRA factors (with
        ``allow_unmatched``, also the unread ones)
    warnings : list of str
    """
    check_peft_type(adapter)
    pairs, skipped, unread = classify(adapter.file.keys())
    findings = _Findings(skipped)
    pairs = _complete_pairs(adapter.file, pairs, unread, findings)
    _refuse_unread(adapter.file, pairs, unread, allow_unmatched, findings)
    lookup = BaseNames(base.keys())
    found = [m for pair in sorted(pairs, key=lambda p: p.name)
             if (m := _match_pair(pair, adapter.file, base, lookup, findings)) is not None]
    _refuse_unmatched(base, findings, allow_unmatched)
    if not found:
        raise NoLoraPairs(f"{adapter.file.path}: no LoRA pair matches a weight of {base.path}")
    modules = _modules(found, adapter, alpha, scaling)
    if any(m.dora_key for m in modules):
        findings.warnings.append("DoRA adapter: the magnitude vectors are not scored, only the low-rank update s·B·A")
    if any(m.scale_source.startswith("default") for m in modules) and alpha is None and scaling is None:
        findings.warnings.append("no adapter_config.json or .alpha tensors: scaling s = 1 assumed "
                                 "(pass --alpha or --scaling)")
    return modules, findings.skipped, findings.warnings


def _complete_pairs(file: SafetensorsFile, pairs: dict[str, Pair], unread: list[Skipped],
                    findings: _Findings) -> list[Pair]:
    """The pairs with both factors; a lone factor is an error, a lone extra tensor skipped
    (alpha) or unread (magnitude, lora_E, bias)."""
    _one_adapter(file, pairs)
    for p in pairs.values():
        if p.complete:
            continue
        if p.parts:
            raise MatchError(f"{file.path}: {p.family} module {p.name} lacks a factor ({', '.join(sorted(p.parts))})")
        if p.up or p.down:
            have, lack = (p.up, "lora_A/lora_down") if p.up else (p.down, "lora_B/lora_up")
            raise MatchError(f"{file.path}: {have} has no matching {lack} tensor")
        if p.alpha:
            findings.skipped.append(Skipped(p.alpha, "alpha without a LoRA pair"))
        unread.extend(Skipped(k, "magnitude/lora_E/bias without a LoRA pair") for k in (p.dora, p.singular, p.bias) if k)
    return [p for p in pairs.values() if p.complete]


def _one_adapter(file: SafetensorsFile, pairs: dict[str, Pair]) -> None:
    """PEFT's adapter names (``lora_A.<name>.weight``): a file may hold one."""
    names = sorted({p.adapter_name for p in pairs.values() if p.adapter_name})
    if len(names) > 1:
        raise InputError(f"{file.path}: holds several adapters ({', '.join(names)}); save each on its own")


def _refuse_unread(file: SafetensorsFile, pairs: list[Pair], unread: list[Skipped], allow_unmatched: bool,
                   findings: _Findings) -> None:
    """No pairs at all, or pairs beside tensors ddiscan cannot read (unless ``allow_unmatched``:
    then a warning, and the unread tensors are listed as skipped)."""
    if not pairs:
        if unread:
            raise NoLoraPairs(f"{file.path}: no LoRA A/B pairs; {unread_summary(unread)}")
        raise NoLoraPairs(f"{file.path}: no LoRA A/B pairs found (expected lora_A/lora_B or lora_down/lora_up keys)")
    if not unread:
        return
    message = f"{file.path}: LoRA pairs beside {unread_summary(unread)}"
    if not allow_unmatched:
        raise MatchError(f"{literal(message)}; refusing to score a part of the adapter ({{allow_unmatched}} scores "
                         "the LoRA pairs alone)", "allow_unmatched")
    findings.warnings.append(f"{message}; only the LoRA pairs are scored")
    findings.skipped.extend(unread)


def _refuse_unmatched(base: TensorIndex, findings: _Findings, allow_unmatched: bool) -> None:
    unmatched = findings.unmatched
    if not unmatched:
        return
    listed = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
    message = f"{len(unmatched)} LoRA module(s) match no base weight in {base.path}: {listed}"
    if not allow_unmatched:
        raise MatchError(message)
    findings.warnings.append(message)


def _match_pair(pair: Pair, file: SafetensorsFile, base: TensorIndex, lookup: BaseNames,
                findings: _Findings) -> BaseMatch | None:
    """The base weight ``pair`` updates, with its checks; None for an AdaLoRA module pruned
    to rank 0 (skipped) or one with no base weight (unmatched)."""
    check_float_factors(pair, file)
    shapes = factor_shapes(pair, file)
    if pair.singular is not None and shapes[2] == 0:  # AdaLoRA's budget pruned every rank: ΔW = 0
        findings.skipped.extend(Skipped(key, "AdaLoRA module with every rank pruned (ΔW = 0)")
                                for key in (pair.down, pair.up, pair.singular))
        return None
    d, k, r, layout = nonempty(shapes, f"{file.path}: {pair.down or pair.name}")
    check_singular(pair, file, r)
    check_magnitude(pair, file, {k if layout == "embedding" else d} if pair.style in ("peft", "mlx") else {d, k})
    base_key = _base_key(pair, base, lookup, d, k, findings)
    if base_key is None:
        findings.unmatched.append(pair.down or pair.name)
        return None
    check_not_quantized(base, lookup.keys, base_key)
    k = vera_width(base.info(base_key).shape, d, k) if pair.style == "vera" else k
    as_is, transposed = base_fit(base.info(base_key).shape, d, k)
    if not (as_is or transposed):
        raise ShapeMismatch(
            f"{pair.down or pair.name}: ΔW is {d} × {k} (rank {r}) but base weight {base_key} is "
            f"{list(base.info(base_key).shape)}"
        )
    return BaseMatch(pair, base_key, d, k, r, layout, as_is, transposed)


def _base_key(pair: Pair, base: TensorIndex, lookup: BaseNames, d: int, k: int, findings: _Findings) -> str | None:
    """The one base key ``pair``'s name finds (a tied embedding for an absent lm_head), None
    for none, MatchError for several."""
    candidates = lookup.kohya(pair.name) if pair.style == "kohya" else lookup.peft(pair.name)
    if not candidates and pair.name.rsplit(".", 1)[-1] == "lm_head":
        candidates = tied_embedding(base, lookup, d, k)
        if len(candidates) == 1:
            findings.warnings.append(f"{pair.name}: no lm_head weight in the base; scored against the tied "
                                     f"input embedding {candidates[0]}")
    if len(candidates) > 1:
        raise MatchError(f"{pair.down or pair.name}: matches several base weights ({', '.join(candidates)}); refusing to guess")
    return candidates[0] if candidates else None


def _modules(found: list[BaseMatch], adapter: Adapter, alpha: float | None, scaling: float | None) -> list[LoraModule]:
    """Each match as a LoraModule, with its scaling and whether W0 is stored transposed."""
    transpose_square = conv1d_evidence(found, adapter.config)
    modules = []
    for m in found:
        pair = m.pair
        transpose = m.transposed and (not m.as_is or transpose_square.get(m.base_key, False))
        scale, source = (structured_scale if pair.family else module_scale)(adapter, pair, m.r, alpha, scaling)
        modules.append(LoraModule(
            name=pair.name, base_key=m.base_key, up_key=pair.up, down_key=pair.down, layout=m.layout,
            d=m.d, k=m.k, r=m.r, scale=scale, scale_source=source, transpose_base=transpose,
            dora_key=pair.dora, alpha_key=pair.alpha, singular_key=pair.singular, bias_key=pair.bias,
            transpose_factors=mlx_transposed(pair), vera=pair.style == "vera", family=pair.family,
            parts=tuple(sorted(pair.parts.items())), core=core_of(pair.family, m.d, m.k, m.r),
        ))
    return modules


# ---------------------------------------------------------------------------------------
# Tensors of one module


def lora_factors(module: LoraModule, file: SafetensorsFile) -> tuple[np.ndarray, np.ndarray]:
    """``(up, down)`` as float64 arrays, d × r and r × k, so that ΔW = s · up · down."""
    if module.vera:
        return vera_factors(module.up_key, module.down_key, module.k, file)
    if module.family is not None:
        return structured_factors(module, file, structured=False)
    up = np.asarray(file.array(module.up_key), dtype=np.float64)
    down = np.asarray(file.array(module.down_key), dtype=np.float64)
    if module.singular_key is not None:  # AdaLoRA: B·diag(E)·A, zero rows of E included
        down = np.asarray(file.array(module.singular_key), dtype=np.float64).reshape(-1, 1) * down
    if module.layout == "embedding":
        return down.T, up.T
    if module.transpose_factors:  # MLX-LM: lora_b is upᵀ (r × d), lora_a downᵀ (k × r)
        return up.T, down.T
    return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)


def orient(module: LoraModule, w0: np.ndarray) -> np.ndarray:
    """The stored base tensor as W0, d × k: transposed (Conv1D) or flattened (convolution)."""
    if module.transpose_base:
        return w0.T
    return w0 if w0.ndim == 2 else w0.reshape(w0.shape[0], -1)


def base_matrix(module: LoraModule, base: TensorIndex) -> np.ndarray:
    """W0 as a d × k view of the mapped base tensor (file dtype, nothing read yet)."""
    return orient(module, base.array(module.base_key))


def dense_delta(module: LoraModule, file: SafetensorsFile) -> np.ndarray:
    """ΔW = s · up · down as a dense float64 d × k matrix (for checks and small modules)."""
    up, down = lora_factors(module, file)
    return module.scale * (up @ down)
