"""Reading an adapter: its tensor file and the ``adapter_config.json`` that came with it.

The config is checked field by field against :data:`CONFIG_SCHEMA` (the fields ddiscan
reads); diffusers' ``lora_adapter_metadata`` in the file's ``__metadata__`` stands in for a
missing config. Which tensors form LoRA pairs is :mod:`ddiscan.grammars`' business.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, NoLoraPairs
from .io.jsonfile import parse_json, read_json
from .io.reader import SafetensorsFile, check_not_pickle
from .refusals import why_not

__all__ = ["Adapter", "CONFIG_SCHEMA", "LORA_PEFT_TYPES", "load_adapter", "check_peft_type"]

LORA_PEFT_TYPES = ("LORA", "ADALORA", "VERA", "LOHA", "LOKR")


@dataclass(frozen=True)
class Adapter:
    """An adapter's tensor file and the configuration that came with it."""

    path: Path
    file: SafetensorsFile
    config: dict | None
    config_source: str | None


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


def _mlx_lora_parameters(value) -> bool:
    """mlx-lm's ``lora_parameters``: ``{"rank": 8, "scale": 20.0, "dropout": 0.0, …}``."""
    return isinstance(value, dict) and _positive_int(value.get("rank")) and _number(value.get("scale"))


def _patterns(check):
    return _optional(lambda value: isinstance(value, dict) and all(check(v) for v in value.values()))


# The adapter_config.json fields ddiscan reads: each check, and what it says the field must be
# (revision is checked where the base is looked for, ddiscan.locate).
CONFIG_SCHEMA = {
    "r": (_positive_int, "a positive integer"),
    "init_r": (_positive_int, "a positive integer"),
    "lora_alpha": (_number, "a number"),
    "alpha": (_number, "a number"),  # LoHa/LoKr
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "rank_pattern": (_patterns(lambda v: _positive_int(v) or _bools(v)),
                     "an object of positive integers (AdaLoRA: of lists of true/false)"),
    "alpha_pattern": (_patterns(_number), "an object of numbers"),
    "target_modules": (_optional(_str_or_strs), "a string or a list of strings"),
    "exclude_modules": (_optional(_str_or_strs), "a string or a list of strings"),
    "base_model_name_or_path": (_optional(lambda v: isinstance(v, str)), "a string"),
    "peft_type": (_optional(lambda v: isinstance(v, str)), "a string"),
    "lora_parameters": (_optional(_mlx_lora_parameters),  # MLX-LM's
                        "an object with a positive integer 'rank' and a number 'scale'"),
}


def _checked_config(config, source: str) -> dict:
    """``config`` if it is an object whose fields ddiscan reads have the types and ranges
    :data:`CONFIG_SCHEMA` gives (diffusers' per-component ``unet.r`` … too); else InputError
    naming the field. Another method's config (peft_type OFT …) is refused by name later."""
    if not isinstance(config, dict):
        raise InputError(f"{source}: is not a JSON object")
    if isinstance(config.get("peft_type"), str) and config["peft_type"].upper() not in LORA_PEFT_TYPES:
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
    """Open an adapter: a ``.safetensors`` file, a PEFT directory or an MLX-LM one
    (``adapters.safetensors`` + ``adapter_config.json``, as ``mlx_lm lora`` writes them).

    A file's sibling ``adapter_config.json`` is used when present; otherwise the
    ``lora_adapter_metadata`` diffusers stores in the file's ``__metadata__``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        file_path = path / "adapter_model.safetensors"
        if not file_path.exists() and (path / "adapters.safetensors").exists():
            file_path = path / "adapters.safetensors"
        if not file_path.exists():
            for pickled in ("adapter_model.bin", "adapter_model.pt"):
                if (path / pickled).exists():
                    check_not_pickle(path / pickled)
            raise InputError(f"{path}: not a PEFT adapter directory (no adapter_model.safetensors, nor MLX-LM's "
                             "adapters.safetensors)")
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


def check_peft_type(adapter: Adapter) -> None:
    """adapter_config.json names the method: anything but LoRA/AdaLoRA/VeRA is refused by
    name, with the reason when DDI does not apply to it (:mod:`ddiscan.refusals`)."""
    peft_type = (adapter.config or {}).get("peft_type")
    if (adapter.config or {}).get("fine_tune_type") == "full":  # mlx_lm lora --fine-tune-type full
        raise NoLoraPairs(f"{adapter.config_source}: fine_tune_type full is an MLX-LM full fine-tune (whole "
                          "weights, no low-rank update); DDI scores low-rank weight updates")
    if peft_type is not None and why_not(peft_type):
        raise NoLoraPairs(f"{adapter.config_source}: peft_type {peft_type} is not supported: {why_not(peft_type)}; "
                          "DDI scores low-rank weight updates")
    if peft_type is not None and str(peft_type).upper() not in LORA_PEFT_TYPES:
        raise NoLoraPairs(
            f"{adapter.config_source}: peft_type {peft_type} is not LoRA; ddiscan reads LoRA, AdaLoRA, LoHa and LoKr "
            f"adapters, {peft_type} is not supported yet"
        )
