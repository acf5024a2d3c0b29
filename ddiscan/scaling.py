"""The scaling s of ΔW = s · up · down, one module at a time (SPEC.md §1).

From a caller's override (``alpha``/``scaling``), a kohya/diffusers ``.alpha`` tensor,
PEFT's ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``,
``alpha_pattern``, per diffusers component) or AdaLoRA's ``init_r``; s = 1 when nothing says.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import regex

from .adapter import Adapter
from .errors import InputError, MatchError, ShapeMismatch
from .io.writer import literal
from .grammars import Pair
from .io.reader import SafetensorsFile

__all__ = ["PATTERN_TIMEOUT_S", "PATTERN_MAX_LENGTH", "module_scale"]

# A rank_pattern/alpha_pattern key is a regular expression from the adapter's author: one
# match may take at most this long (a benign key takes microseconds; a catastrophically
# backtracking one, say (a|aa)+b on a long name, would take years), and a key this long.
PATTERN_TIMEOUT_S = 0.1
PATTERN_MAX_LENGTH = 1000


@functools.lru_cache(maxsize=1024)
def _compiled_pattern(key: str):
    r"""PEFT's pattern ``(.*\.)?(KEY)$`` for one key, compiled by the ``regex`` module (the
    syntax of ``re``, plus a timeout)."""
    if len(key) > PATTERN_MAX_LENGTH:
        raise InputError(f"adapter config pattern {key[:40]!r}...: longer than {PATTERN_MAX_LENGTH} characters")
    try:
        regex.compile(key)  # alone first, so that an error's position is the key's
        return regex.compile(rf"(.*\.)?({key})$")
    except (regex.error, OverflowError, RecursionError) as exc:
        raise InputError(f"adapter config pattern {key!r}: not a valid regular expression ({exc})") from None


def _pattern_value(patterns: dict, module: str, default):
    r"""PEFT's rule: the first pattern key that matches the end of the module name (as
    ``re.match(rf"(.*\.)?({key})$", module)``), each match bounded by PATTERN_TIMEOUT_S."""
    if patterns is not None and not isinstance(patterns, dict):
        raise InputError(f"rank_pattern/alpha_pattern must be a JSON object of patterns, not {type(patterns).__name__}")
    for key, value in (patterns or {}).items():
        try:
            if _compiled_pattern(key).match(module, timeout=PATTERN_TIMEOUT_S):
                return value
        except TimeoutError:
            raise InputError(f"adapter config pattern {key!r}: took over {PATTERN_TIMEOUT_S:g} s to match {module} "
                             "(catastrophic backtracking); refused") from None
    return default


def _component_config(config: dict | None, name: str) -> tuple[dict | None, str]:
    """diffusers stores one config per pipeline component, keys prefixed ``unet.``…"""
    if config is None or "r" in config or "lora_alpha" in config:
        return config, name
    component, _, rest = name.partition(".")
    sub = {k[len(component) + 1:]: v for k, v in config.items() if k.startswith(component + ".")}
    return (sub or None), rest


def _peft_scale(config: dict | None, source: str, name: str, rank: int) -> tuple[float, str] | None:
    config, module = _component_config(config, name)
    if config is None:
        return None
    try:
        r = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{source}: needs numeric 'r' and 'lora_alpha'") from None
    if r != rank:
        raise ShapeMismatch(f"{source}: says r={r} for {name}, but its LoRA tensors have rank {rank}")
    if config.get("use_rslora"):
        return alpha / math.sqrt(r), f"{source} (lora_alpha={alpha:g}/sqrt(r={r}), rsLoRA)"
    return alpha / r, f"{source} (lora_alpha={alpha:g}/r={r})"


def _adalora_scale(adapter: Adapter, pair: Pair, rank: int) -> tuple[float, str]:
    """PEFT's AdaLoRA: ΔW = B·(A ⊙ E) · scaling / (ranknum + 1e-5), scaling = lora_alpha (r when
    lora_alpha is 0) and ranknum = init_r, which PEFT does not save and keeps after a rank
    pattern prunes ranks; lora_E is folded into A by :func:`lora_factors`."""
    source = adapter.config_source or str(adapter.file.path)
    config = adapter.config or {}
    if pair.singular is None:
        raise MatchError(f"{source}: AdaLoRA adapter, but {pair.down} has no lora_E beside it")
    if config.get("peft_type") != "ADALORA":
        raise InputError(f"{literal(pair.singular)}: an AdaLoRA lora_E needs its adapter_config.json (peft_type "
                         "ADALORA, init_r, lora_alpha) for the scaling, or give {scaling}", "scaling")
    try:
        init_r = int(config["init_r"])
        alpha = float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{source}: an AdaLoRA config needs numeric 'init_r' and 'lora_alpha'") from None
    if not 0 < rank <= init_r:
        raise ShapeMismatch(f"{source}: says init_r={init_r} for {pair.name}, but its AdaLoRA tensors have rank {rank}")
    scaling = alpha if alpha > 0 else float(rank)
    return scaling / (init_r + 1e-5), f"{source} (AdaLoRA: lora_alpha={scaling:g}/(init_r={init_r}+1e-5))"


def _mlx_scale(adapter: Adapter, rank: int) -> tuple[float, str] | None:
    """mlx-lm's ``lora_parameters.scale``: ΔW = scale · (lora_a·lora_b)ᵀ, no division by the
    rank (mlx_lm/tuner/lora.py, ``LoRALinear.fuse``); None without an adapter config."""
    config = adapter.config
    if config is None:
        return None
    source = adapter.config_source
    parameters = config.get("lora_parameters")
    if not isinstance(parameters, dict):  # its type is checked by ddiscan.adapter.CONFIG_SCHEMA
        raise InputError(f"{literal(str(source))}: an MLX-LM adapter's config needs lora_parameters (rank, scale), "
                         "or give {scaling}", "scaling")
    if parameters["rank"] != rank:
        raise ShapeMismatch(f"{source}: says lora_parameters.rank={parameters['rank']}, but its LoRA tensors have "
                            f"rank {rank}")
    scale = float(parameters["scale"])
    return scale, f"{source} (MLX-LM lora_parameters.scale={scale:g})"


def _scalar(file: SafetensorsFile, key: str) -> float:
    value = np.asarray(file.array(key), dtype=np.float64).ravel()
    if value.size != 1:
        raise ShapeMismatch(f"{file.path}: {key} should hold one number, holds {value.size}")
    return float(value[0])


def module_scale(adapter: Adapter, pair: Pair, rank: int, alpha: float | None, scaling: float | None) -> tuple[float, str]:
    """``(s, where s came from)`` for one LoRA pair of rank ``rank``; the text is the report's
    ``scale_source``."""
    if scaling is not None:
        return float(scaling), f"--scaling {scaling:g}"
    if alpha is not None:
        return alpha / rank, f"--alpha {alpha:g} / r={rank}"
    if pair.style in ("kohya", "diffusers"):
        if pair.alpha:
            a = _scalar(adapter.file, pair.alpha)
            return a / rank, f"{pair.alpha} (alpha={a:g}/r={rank})"
        return 1.0, "default (no .alpha tensor: alpha = r)"
    if pair.style == "vera":
        return 1.0, "VeRA (no scaling: ΔW = diag(lambda_b)·vera_B·diag(lambda_d)·vera_A)"
    if pair.style == "mlx":
        return _mlx_scale(adapter, rank) or (1.0, "default (no adapter config)")
    if pair.singular is not None or (adapter.config or {}).get("peft_type") == "ADALORA":
        return _adalora_scale(adapter, pair, rank)
    scale = _peft_scale(adapter.config, adapter.config_source or "", pair.name, rank)
    if scale is None:
        return 1.0, "default (no adapter config)"
    return scale
