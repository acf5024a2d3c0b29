"""Adapter files → LoRA modules matched to base weights, each with its scaling.

Three key layouts are read (SPEC.md §1):

* **PEFT** (also diffusers and mergekit, which use PEFT keys under other prefixes):
  ``base_model.model.<path>.lora_A[.<adapter>].weight`` / ``lora_B`` (with ``lora_B.bias``
  under ``lora_bias=True``), and ``<path>.lora_embedding_A`` / ``lora_embedding_B`` for
  embeddings. The scaling comes from ``adapter_config.json`` (``r``, ``lora_alpha``,
  ``use_rslora``, ``rank_pattern``, ``alpha_pattern``), or from the ``lora_adapter_metadata``
  entry diffusers writes into the file's ``__metadata__``. AdaLoRA adds ``lora_E`` (r × 1):
  ΔW = B·diag(E)·A · lora_alpha / (init_r + 1e-5), as PEFT's ``SVDLinear.get_delta_weight``.
* **kohya / sd-scripts**: ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and an
  optional ``<name>.alpha``, where ``<name>`` is ``lora_unet_``/``lora_te_``… followed by the
  base key with dots written as underscores.
* **diffusers before PEFT** (its SD/SDXL training scripts, ``LoRALinearLayer`` /
  ``LoRAConv2dLayer``): ``<path>.lora.down.weight`` / ``.lora.up.weight``,
  ``<path>.lora_linear_layer.down.weight`` (text encoders) and attention-processor keys
  ``<attn>.processor.to_q_lora.down.weight`` (``to_k``/``to_v``; ``to_out_lora`` is
  ``to_out.0``), with an optional ``<path>.alpha``: s = alpha / r, or 1 without one.

Every other tensor that carries an update (a LoRA-looking key in no layout above, or a
LoHa/LoKr/OFT/BOFT/IA3/VeRA tensor) is *unread*: an error, or a counted warning with
``allow_unmatched``, never a silent drop.

Every module is returned in PyTorch ``nn.Linear`` terms: ``up`` is d × r, ``down`` is r × k
and ΔW = s · up · down has the shape (d, k) of the base weight as scored (after a GPT-2
``Conv1D`` transpose or a convolution flatten).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import regex

from .errors import InputError, MatchError, NoLoraPairs, QuantizedBase, ShapeMismatch, UnsupportedDtype
from .io.index import TensorIndex
from .io.jsonfile import parse_json, read_json
from .io.reader import FLOAT_DTYPES, SafetensorsFile, check_not_pickle

__all__ = [
    "Adapter", "LoraModule", "Skipped", "load_adapter", "match_modules", "lora_factors", "base_matrix", "orient",
    "dense_delta", "module_keys", "adapter_kind",
]

PEFT_PREFIX = "base_model.model."
KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_transformer_", "lora_")
_PEFT_PARTS = {"lora_A": "down", "lora_B": "up", "lora_embedding_A": "down", "lora_embedding_B": "up"}
_CONV1D_NAMES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
# Tensors that sit beside a quantized weight (bitsandbytes 4/8-bit, FP8 checkpoints).
_QUANT_SIBLINGS = (
    ".weight.absmax", ".weight.quant_map", ".weight.nested_absmax",
    ".weight.quant_state.bitsandbytes__nf4", ".weight.quant_state.bitsandbytes__fp4",
    ".SCB", ".weight_format", ".weight_scale_inv", ".weight_scale", ".input_scale",
)


@dataclass(frozen=True)
class Adapter:
    """An adapter's tensor file and the configuration that came with it."""

    path: Path
    file: SafetensorsFile
    config: dict | None
    config_source: str | None


@dataclass(frozen=True)
class Skipped:
    """An adapter tensor that is not part of a LoRA pair, and why it was passed over."""

    key: str
    reason: str


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
        keys = (self.down_key, self.up_key, self.singular_key, self.bias_key, self.dora_key, self.alpha_key)
        return tuple(k for k in keys if k)


# ---------------------------------------------------------------------------------------
# Loading the adapter


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value) -> bool:
    """An int or float, not a bool; NaN/Inf included (their modules are reported non-finite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional(check):
    return lambda value: value is None or check(value)


def _str_or_strs(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _bools(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, bool) for v in value)


def _patterns(check):
    return _optional(lambda value: isinstance(value, dict) and all(check(v) for v in value.values()))


# The adapter_config.json fields ddiscan reads: each check, and what it says the field must be
# (revision is checked where the base is looked for, ddiscan.locate).
CONFIG_SCHEMA = {
    "r": (_positive_int, "a positive integer"),
    "init_r": (_positive_int, "a positive integer"),
    "lora_alpha": (_number, "a number"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "rank_pattern": (_patterns(lambda v: _positive_int(v) or _bools(v)),
                     "an object of positive integers (AdaLoRA: of lists of true/false)"),
    "alpha_pattern": (_patterns(_number), "an object of numbers"),
    "target_modules": (_optional(_str_or_strs), "a string or a list of strings"),
    "exclude_modules": (_optional(_str_or_strs), "a string or a list of strings"),
    "base_model_name_or_path": (_optional(lambda v: isinstance(v, str)), "a string"),
    "peft_type": (_optional(lambda v: isinstance(v, str)), "a string"),
}


def _checked_config(config, source: str) -> dict:
    """``config`` if it is an object whose fields ddiscan reads have the types and ranges
    :data:`CONFIG_SCHEMA` gives (diffusers' per-component ``unet.r`` … too); else InputError
    naming the field. Another method's config (peft_type OFT …) is refused by name later."""
    if not isinstance(config, dict):
        raise InputError(f"{source}: is not a JSON object")
    if isinstance(config.get("peft_type"), str) and config["peft_type"].upper() not in _LORA_PEFT_TYPES:
        return config
    for key, value in config.items():
        field = key.rsplit(".", 1)[-1]
        if field in CONFIG_SCHEMA:
            check, expected = CONFIG_SCHEMA[field]
            if not check(value):
                shown = repr(value)
                shown = shown if len(shown) <= 60 else shown[:57] + "..."
                raise InputError(f"{source}: {key!r} must be {expected}, not {shown}")
    return config


def _read_config(path: Path) -> dict:
    return _checked_config(read_json(path, "adapter_config.json", non_finite=True), str(path))


def load_adapter(path) -> Adapter:
    """Open an adapter: a ``.safetensors`` file or a PEFT directory.

    A file's sibling ``adapter_config.json`` is used when present; otherwise the
    ``lora_adapter_metadata`` diffusers stores in the file's ``__metadata__``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        file_path = path / "adapter_model.safetensors"
        if not file_path.exists():
            for pickled in ("adapter_model.bin", "adapter_model.pt"):
                if (path / pickled).exists():
                    check_not_pickle(path / pickled)
            raise InputError(f"{path}: not a PEFT adapter directory (no adapter_model.safetensors)")
    else:
        file_path = path
    file = SafetensorsFile(file_path)
    config_path = file_path.parent / "adapter_config.json"
    if config_path.exists():
        return Adapter(path, file, _read_config(config_path), str(config_path))
    raw = (file.metadata or {}).get("lora_adapter_metadata")
    if raw is not None:
        source = "__metadata__['lora_adapter_metadata']"
        config = _checked_config(parse_json(raw, f"the diffusers {source}", file_path, non_finite=True), f"{file_path}: {source}")
        return Adapter(path, file, config, source)
    return Adapter(path, file, None, None)


# ---------------------------------------------------------------------------------------
# Grouping adapter keys into LoRA pairs


# Key components that name a non-LoRA PEFT/LyCORIS method, by prefix.
_ALGORITHMS = (("hada_", "LoHa"), ("lokr_", "LoKr"), ("boft_", "BOFT"), ("oft_", "OFT"), ("ia3_", "IA3"),
               ("vera_", "VeRA"))
# "lora" as a word of a key component: lora_A, lora_down, lora_unet_…, to_q_lora, lora_linear_layer
_LORA_WORD = re.compile(r"(?:^|_)lora(?:_|$)", re.IGNORECASE)
# mlx-lm's LoRALinear (mlx_lm/tuner/lora.py): <module>.lora_a (in × r), <module>.lora_b (r × out)
_MLX_FACTORS = ("lora_a", "lora_b")
# diffusers' attention-processor LoRA (LoRAAttnProcessor): <attn>.processor.to_q_lora.down.weight
_PROCESSOR_FACTOR = re.compile(r"to_(q|k|v|out)_lora")


@dataclass
class _Pair:
    name: str
    style: str | None = None  # "peft", "kohya" or "diffusers", from the factor keys
    up: str | None = None
    down: str | None = None
    embedding: bool = False
    dora: str | None = None
    alpha: str | None = None
    singular: str | None = None  # AdaLoRA's lora_E
    bias: str | None = None  # lora_B.bias
    adapter_name: str | None = None
    extra: list = field(default_factory=list)

    def assign(self, slot: str, key: str, style: str | None = None) -> None:
        if getattr(self, slot) is not None:
            raise MatchError(f"{key} and {getattr(self, slot)}: two {slot} tensors for LoRA module {self.name}")
        setattr(self, slot, key)
        if style is not None:
            if self.style not in (None, style):
                raise MatchError(f"{key}: LoRA module {self.name} mixes {self.style} and {style} keys")
            self.style = style


def _algorithm(parts: list[str]) -> str | None:
    for part in parts:
        for prefix, name in _ALGORITHMS:
            if part.startswith(prefix):
                return name
    return None


def _diffusers_module(stem: list[str]) -> list[str] | None:
    """The module path of a pre-PEFT diffusers LoRA factor (key without ``.down.weight``),
    or None when ``stem`` is not in that layout."""
    *path, last = stem
    if not path:
        return None
    if last in ("lora", "lora_linear_layer"):
        return path
    match = _PROCESSOR_FACTOR.fullmatch(last)
    if match is None:
        return None
    if path[-1] == "processor":
        path = path[:-1]
    return path + (["to_out", "0"] if match.group(1) == "out" else [f"to_{match.group(1)}"])


def _legit_skip(key: str, parts: list[str]) -> str | None:
    """Why a tensor that is no LoRA factor is passed over, or None when it carries an update
    ddiscan cannot read."""
    if "trainable_tokens" in key or "token_adapter" in key:
        return "trainable tokens"
    if ".base_layer." in key:
        return "full weight (base layer saved by PEFT)"
    if "modules_to_save" in key:
        return "full weight (modules_to_save)"
    if any(_LORA_WORD.search(part) for part in parts):
        return None
    if parts[-1] == "bias":
        return "bias"
    if key.startswith(PEFT_PREFIX):
        return "full weight (modules_to_save)"
    return "not a LoRA tensor"


def _classify(keys) -> tuple[dict[str, _Pair], list[Skipped], list[Skipped]]:
    """LoRA pairs by module name; tensors legitimately skipped; tensors with an update that
    ddiscan cannot read (unread)."""
    pairs: dict[str, _Pair] = {}
    skipped: list[Skipped] = []
    unread: list[Skipped] = []

    def pair(name):
        return pairs.setdefault(name, _Pair(name))

    for key in keys:
        parts = key.split(".")
        algorithm = _algorithm(parts)
        if algorithm:
            unread.append(Skipped(key, f"{algorithm} tensor (not LoRA; not supported yet)"))
            continue
        if parts[-1] in _MLX_FACTORS:
            unread.append(Skipped(key, "MLX-LM LoRA tensor (not supported yet)"))
            continue
        if len(parts) >= 3 and parts[-2] in ("lora_down", "lora_up") and parts[-1] == "weight":
            pair(".".join(parts[:-2])).assign(parts[-2].removeprefix("lora_"), key, "kohya")
            continue
        module = _diffusers_module(parts[:-2]) if len(parts) >= 3 and parts[-2] in ("down", "up") else None
        if module and parts[-1] == "weight":
            pair(".".join(module)).assign(parts[-2], key, "diffusers")
            continue
        if len(parts) >= 2 and parts[-1] in ("alpha", "dora_scale"):
            name = ".".join(_diffusers_module(parts[:-1]) or parts[:-1])
            pair(name).assign("alpha" if parts[-1] == "alpha" else "dora", key)
            continue
        stem = parts[:-1] if parts[-1] in ("weight", "bias") else parts
        found = None
        for i in (len(stem) - 1, len(stem) - 2):
            if i >= 1 and (stem[i] in _PEFT_PARTS or stem[i] in ("lora_magnitude_vector", "lora_E")):
                found = i
                break
        if found is None or (parts[-1] == "bias" and stem[found] != "lora_B"):
            reason = _legit_skip(key, parts)
            if reason is None:
                unread.append(Skipped(key, "LoRA-looking tensor in a layout ddiscan does not read"))
            else:
                skipped.append(Skipped(key, reason))
            continue
        name = ".".join(stem[:found])
        name = name.removeprefix(PEFT_PREFIX)
        adapter_name = stem[found + 1] if found + 1 < len(stem) else None
        p = pair(name)
        p.adapter_name = p.adapter_name or adapter_name
        part = stem[found]
        if part == "lora_magnitude_vector":
            p.assign("dora", key)
        elif part == "lora_E":
            p.assign("singular", key)
        elif parts[-1] == "bias":
            p.assign("bias", key)
        else:
            p.assign(_PEFT_PARTS[part], key, "peft")
            p.embedding = p.embedding or part.startswith("lora_embedding")
    return pairs, skipped, unread


# ---------------------------------------------------------------------------------------
# Matching module names to base keys


class _BaseNames:
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


# ---------------------------------------------------------------------------------------
# Scaling


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


def _adalora_scale(adapter: Adapter, pair: _Pair, rank: int) -> tuple[float, str]:
    """PEFT's AdaLoRA: ΔW = B·(A ⊙ E) · scaling / (ranknum + 1e-5), scaling = lora_alpha (r when
    lora_alpha is 0) and ranknum = init_r, which PEFT does not save and keeps after a rank
    pattern prunes ranks; lora_E is folded into A by :func:`lora_factors`."""
    source = adapter.config_source or str(adapter.file.path)
    config = adapter.config or {}
    if pair.singular is None:
        raise MatchError(f"{source}: AdaLoRA adapter, but {pair.down} has no lora_E beside it")
    if config.get("peft_type") != "ADALORA":
        raise InputError(f"{pair.singular}: an AdaLoRA lora_E needs its adapter_config.json (peft_type ADALORA, "
                         "init_r, lora_alpha) for the scaling, or pass --scaling")
    try:
        init_r = int(config["init_r"])
        alpha = float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{source}: an AdaLoRA config needs numeric 'init_r' and 'lora_alpha'") from None
    if not 0 < rank <= init_r:
        raise ShapeMismatch(f"{source}: says init_r={init_r} for {pair.name}, but its AdaLoRA tensors have rank {rank}")
    scaling = alpha if alpha > 0 else float(rank)
    return scaling / (init_r + 1e-5), f"{source} (AdaLoRA: lora_alpha={scaling:g}/(init_r={init_r}+1e-5))"


def _scalar(file: SafetensorsFile, key: str) -> float:
    value = np.asarray(file.array(key), dtype=np.float64).ravel()
    if value.size != 1:
        raise ShapeMismatch(f"{file.path}: {key} should hold one number, holds {value.size}")
    return float(value[0])


# ---------------------------------------------------------------------------------------
# Shapes


def _factor_shapes(pair: _Pair, file: SafetensorsFile) -> tuple[int, int, int, str]:
    """(d, k, r, layout) of ΔW from the factor shapes, or ShapeMismatch."""
    up = file.tensors[pair.up].shape
    down = file.tensors[pair.down].shape
    where = f"{file.path}: {pair.up} {list(up)} / {pair.down} {list(down)}"
    if pair.embedding:
        # lora_embedding_A is r × num_embeddings, lora_embedding_B is dim × r; ΔW = (B·A)ᵀ
        if len(up) != 2 or len(down) != 2 or up[1] != down[0]:
            raise ShapeMismatch(f"{where}: embedding factors do not chain")
        return down[1], up[0], down[0], "embedding"
    if len(up) == 2 and len(down) == 2:
        if up[1] != down[0]:
            raise ShapeMismatch(f"{where}: lora_B is d × r and lora_A is r × k, but the ranks differ")
        return up[0], down[1], down[0], "linear"
    if len(up) >= 3 and len(down) == len(up):
        if math.prod(up[2:]) != 1 or up[1] != down[0]:
            raise ShapeMismatch(f"{where}: unsupported convolution LoRA layout")
        return up[0], math.prod(down[1:]), down[0], "conv"
    raise ShapeMismatch(f"{where}: LoRA factors must both be 2-D (or both 4-D convolution kernels)")


def _check_float_factors(pair: _Pair, file: SafetensorsFile) -> None:
    """LoRA factors are floats: an integer or boolean factor is not an update ddiscan can score."""
    for key in (pair.down, pair.up, pair.singular, pair.bias):
        if key is not None and file.tensors[key].dtype not in FLOAT_DTYPES:
            raise UnsupportedDtype(f"{file.path}: {key} has dtype {file.tensors[key].dtype}; LoRA factors must be "
                                   f"floating point ({', '.join(sorted(FLOAT_DTYPES))})")


def _check_singular(pair: _Pair, file: SafetensorsFile, r: int) -> None:
    """AdaLoRA's lora_E holds one value per rank: r × 1."""
    if pair.singular is None:
        return
    shape = tuple(file.tensors[pair.singular].shape)
    if shape not in ((r, 1), (r,)):
        raise ShapeMismatch(f"{file.path}: {pair.singular} is {list(shape)}, AdaLoRA's lora_E must be {r} × 1")


def _check_magnitude(pair: _Pair, file: SafetensorsFile, sizes: set[int]) -> None:
    """A DoRA magnitude holds one float per output feature (PEFT's; per embedding dimension
    of an embedding) or, in LyCORIS's ``dora_scale``, per input or output feature: checked
    before scoring, so that a report never passes what pruning would refuse."""
    if pair.dora is None:
        return
    info = file.tensors[pair.dora]
    if info.dtype not in FLOAT_DTYPES or info.numel not in sizes:
        raise ShapeMismatch(f"{file.path}: {pair.dora} is {info.dtype} {list(info.shape)}; a DoRA magnitude of "
                            f"this module must hold {' or '.join(map(str, sorted(sizes)))} floats")


def _nonempty(shapes: tuple[int, int, int, str], where: str) -> tuple[int, int, int, str]:
    d, k, r, layout = shapes
    if min(d, k, r) == 0:
        raise ShapeMismatch(f"{where}: empty LoRA factors (d={d}, k={k}, rank {r})")
    return shapes


def _base_fit(shape: tuple[int, ...], d: int, k: int) -> tuple[bool, bool]:
    """Whether a base tensor of ``shape`` is W0 as is, and whether it is W0ᵀ."""
    if len(shape) > 2:
        return (shape[0] == d and math.prod(shape[1:]) == k), False
    if len(shape) != 2:
        return False, False
    return tuple(shape) == (d, k), tuple(shape) == (k, d)


# ---------------------------------------------------------------------------------------
# Putting it together


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
    file = adapter.file
    _check_peft_type(adapter)
    pairs, skipped, unread = _classify(file.keys())
    warnings: list[str] = []
    names = sorted({p.adapter_name for p in pairs.values() if p.adapter_name})
    if len(names) > 1:
        raise InputError(f"{file.path}: holds several adapters ({', '.join(names)}); save each on its own")
    incomplete = [p for p in pairs.values() if not (p.up and p.down)]
    for p in incomplete:
        if p.up or p.down:
            have, lack = (p.up, "lora_A/lora_down") if p.up else (p.down, "lora_B/lora_up")
            raise MatchError(f"{file.path}: {have} has no matching {lack} tensor")
        if p.alpha:
            skipped.append(Skipped(p.alpha, "alpha without a LoRA pair"))
        unread.extend(Skipped(k, "magnitude/lora_E/bias without a LoRA pair") for k in (p.dora, p.singular, p.bias) if k)
    pairs = {n: p for n, p in pairs.items() if p.up and p.down}
    if not pairs:
        if unread:
            raise NoLoraPairs(f"{file.path}: no LoRA A/B pairs; {_unread_summary(unread)}")
        raise NoLoraPairs(f"{file.path}: no LoRA A/B pairs found (expected lora_A/lora_B or lora_down/lora_up keys)")
    if unread:
        message = f"{file.path}: LoRA pairs beside {_unread_summary(unread)}"
        if not allow_unmatched:
            raise MatchError(f"{message}; refusing to score a part of the adapter (--allow-unmatched scores the LoRA pairs alone)")
        warnings.append(f"{message}; only the LoRA pairs are scored")
        skipped.extend(unread)

    lookup = _BaseNames(base.keys())
    found: list[tuple[_Pair, str, int, int, int, str, bool, bool]] = []
    unmatched: list[str] = []
    for pair in sorted(pairs.values(), key=lambda p: p.name):
        _check_float_factors(pair, file)
        shapes = _factor_shapes(pair, file)
        if pair.singular is not None and shapes[2] == 0:  # AdaLoRA's budget pruned every rank: ΔW = 0
            skipped.extend(Skipped(key, "AdaLoRA module with every rank pruned (ΔW = 0)")
                           for key in (pair.down, pair.up, pair.singular))
            continue
        d, k, r, layout = _nonempty(shapes, f"{file.path}: {pair.down}")
        _check_singular(pair, file, r)
        _check_magnitude(pair, file, {k if layout == "embedding" else d} if pair.style == "peft" else {d, k})
        candidates = lookup.kohya(pair.name) if pair.style == "kohya" else lookup.peft(pair.name)
        if not candidates and pair.name.rsplit(".", 1)[-1] == "lm_head":
            candidates = _tied_embedding(base, lookup, d, k)
            if len(candidates) == 1:
                warnings.append(f"{pair.name}: no lm_head weight in the base; scored against the tied "
                                f"input embedding {candidates[0]}")
        if len(candidates) > 1:
            raise MatchError(f"{pair.down}: matches several base weights ({', '.join(candidates)}); refusing to guess")
        if not candidates:
            unmatched.append(pair.down)
            continue
        base_key = candidates[0]
        _check_not_quantized(base, lookup.keys, base_key)
        as_is, transposed = _base_fit(base.info(base_key).shape, d, k)
        if not (as_is or transposed):
            raise ShapeMismatch(
                f"{pair.down}: ΔW is {d} × {k} (rank {r}) but base weight {base_key} is "
                f"{list(base.info(base_key).shape)}"
            )
        found.append((pair, base_key, d, k, r, layout, as_is, transposed))
    if unmatched:
        listed = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
        message = f"{len(unmatched)} LoRA module(s) match no base weight in {base.path}: {listed}"
        if not allow_unmatched:
            raise MatchError(message)
        warnings.append(message)
    if not found:
        raise NoLoraPairs(f"{file.path}: no LoRA pair matches a weight of {base.path}")

    transpose_square = _conv1d_evidence(found, adapter.config)
    modules = []
    for pair, base_key, d, k, r, layout, as_is, transposed in found:
        transpose = transposed and (not as_is or transpose_square.get(base_key, False))
        scale, source = _scale(adapter, pair, r, alpha, scaling)
        modules.append(LoraModule(
            name=pair.name, base_key=base_key, up_key=pair.up, down_key=pair.down, layout=layout,
            d=d, k=k, r=r, scale=scale, scale_source=source, transpose_base=transpose,
            dora_key=pair.dora, alpha_key=pair.alpha, singular_key=pair.singular, bias_key=pair.bias,
        ))
    if any(m.dora_key for m in modules):
        warnings.append("DoRA adapter: the magnitude vectors are not scored, only the low-rank update s·B·A")
    if any(m.scale_source.startswith("default") for m in modules) and alpha is None and scaling is None:
        warnings.append("no adapter_config.json or .alpha tensors: scaling s = 1 assumed (pass --alpha or --scaling)")
    return modules, skipped, warnings


def _unread_summary(unread: list[Skipped]) -> str:
    """``12 tensors ddiscan cannot read (LoHa tensor …: 12): key, key and 10 more``"""
    counts: dict[str, int] = {}
    for s in unread:
        counts[s.reason] = counts.get(s.reason, 0) + 1
    kinds = "; ".join(f"{reason}: {n}" for reason, n in counts.items())
    keys = [s.key for s in unread]
    listed = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return f"{len(keys)} tensor(s) ddiscan cannot read ({kinds}): {listed}"


_LORA_PEFT_TYPES = ("LORA", "ADALORA")


def _check_peft_type(adapter: Adapter) -> None:
    """adapter_config.json names the method: anything but LoRA/AdaLoRA is refused by name."""
    peft_type = (adapter.config or {}).get("peft_type")
    if peft_type is not None and str(peft_type).upper() not in _LORA_PEFT_TYPES:
        raise NoLoraPairs(
            f"{adapter.config_source}: peft_type {peft_type} is not LoRA; ddiscan reads LoRA and AdaLoRA "
            f"adapters, {peft_type} is not supported yet"
        )


_EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def _tied_embedding(base: TensorIndex, lookup: _BaseNames, d: int, k: int) -> list[str]:
    """Checkpoints with tied embeddings store no lm_head: its weight is the input embedding."""
    return sorted(
        key for key in lookup.keys
        if key.endswith(_EMBEDDING_NAMES) and tuple(base.info(key).shape) == (d, k)
    )


def _check_not_quantized(base: TensorIndex, keys: set, base_key: str) -> None:
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


def _conv1d_evidence(found, config) -> dict[str, bool]:
    """For square weights the shape cannot tell a GPT-2 Conv1D (stored k × d) from a Linear.

    Decide as PEFT does, by the layer's type, inferred from non-square weights of the same
    kind in the same checkpoint; failing that, of any kind; failing that, the adapter's
    ``fan_in_fan_out``, then the Conv1D layer names of GPT-2.
    """
    by_kind: dict[str, set[bool]] = {}
    for _, base_key, d, k, _, layout, as_is, transposed in found:
        if layout == "linear" and as_is != transposed:  # embeddings and convs are never Conv1D
            by_kind.setdefault(base_key.rsplit(".", 2)[-2], set()).add(transposed)
    overall = set().union(*by_kind.values()) if by_kind else set()
    decision = {}
    for _, base_key, d, k, _, _, as_is, transposed in found:
        if not (as_is and transposed):
            continue
        kind = base_key.rsplit(".", 2)[-2]
        evidence = by_kind.get(kind) if len(by_kind.get(kind, ())) == 1 else (overall if len(overall) == 1 else None)
        if evidence:
            decision[base_key] = next(iter(evidence))
        elif config is not None and "fan_in_fan_out" in config:
            decision[base_key] = bool(config["fan_in_fan_out"])
        else:
            decision[base_key] = kind in _CONV1D_NAMES
    return decision


def _scale(adapter: Adapter, pair: _Pair, rank: int, alpha: float | None, scaling: float | None) -> tuple[float, str]:
    if scaling is not None:
        return float(scaling), f"--scaling {scaling:g}"
    if alpha is not None:
        return alpha / rank, f"--alpha {alpha:g} / r={rank}"
    if pair.style in ("kohya", "diffusers"):
        if pair.alpha:
            a = _scalar(adapter.file, pair.alpha)
            return a / rank, f"{pair.alpha} (alpha={a:g}/r={rank})"
        return 1.0, "default (no .alpha tensor: alpha = r)"
    if pair.singular is not None or (adapter.config or {}).get("peft_type") == "ADALORA":
        return _adalora_scale(adapter, pair, rank)
    scale = _peft_scale(adapter.config, adapter.config_source or "", pair.name, rank)
    if scale is None:
        return 1.0, "default (no adapter config)"
    return scale


# ---------------------------------------------------------------------------------------
# Tensors of one module


def lora_factors(module: LoraModule, file: SafetensorsFile) -> tuple[np.ndarray, np.ndarray]:
    """``(up, down)`` as float64 arrays, d × r and r × k, so that ΔW = s · up · down."""
    up = np.asarray(file.array(module.up_key), dtype=np.float64)
    down = np.asarray(file.array(module.down_key), dtype=np.float64)
    if module.singular_key is not None:  # AdaLoRA: B·diag(E)·A, zero rows of E included
        down = np.asarray(file.array(module.singular_key), dtype=np.float64).reshape(-1, 1) * down
    if module.layout == "embedding":
        return down.T, up.T
    return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)


def orient(module: LoraModule, w0: np.ndarray) -> np.ndarray:
    """The stored base tensor as W0, d × k: transposed (Conv1D) or flattened (convolution)."""
    if module.transpose_base:
        return w0.T
    return w0.reshape(w0.shape[0], -1)


def base_matrix(module: LoraModule, base: TensorIndex) -> np.ndarray:
    """W0 as a d × k view of the mapped base tensor (file dtype, nothing read yet)."""
    return orient(module, base.array(module.base_key))


def dense_delta(module: LoraModule, file: SafetensorsFile) -> np.ndarray:
    """ΔW = s · up · down as a dense float64 d × k matrix (for checks and small modules)."""
    up, down = lora_factors(module, file)
    return module.scale * (up @ down)


def adapter_kind(keys) -> str | None:
    """What the key names alone say a file is: ``"mlx"`` for an MLX-LM adapter (its
    ``lora_a``/``lora_b`` factors only, which ddiscan does not read yet), ``"adapter"`` when
    any key is named as an adapter's (a LoRA factor, a DoRA magnitude, another method's
    update tensor, PEFT's ``base_model.model.`` or kohya's ``lora_`` prefix), else None."""
    keys = list(keys)
    pairs, _, unread = _classify(keys)
    if unread and all(k.key.rsplit(".", 1)[-1] in _MLX_FACTORS for k in unread) and not pairs:
        return "mlx"
    if any(key.startswith((PEFT_PREFIX, *KOHYA_PREFIXES)) for key in keys) or unread:
        return "adapter"
    return "adapter" if any(p.up or p.down or p.dora for p in pairs.values()) else None


def module_keys(file: SafetensorsFile) -> dict[str, dict[str, list[str]]]:
    """Each LoRA module's adapter keys: ``factors`` (A/B or down/up, AdaLoRA's lora_E and
    lora_B.bias: all that zeroing removes the module's update) and ``extra`` (DoRA magnitude,
    kohya alpha), by module name, read from the key names alone (no base)."""
    pairs, _, _ = _classify(file.keys())
    return {
        name: {"factors": [k for k in (p.down, p.up, p.singular, p.bias) if k],
               "extra": [k for k in (p.dora, p.alpha) if k]}
        for name, p in pairs.items() if p.up and p.down
    }
