"""A pruned copy of an adapter: the selected modules' updates removed, every other byte kept.

``zero`` mode keeps every key, shape and dtype and writes zeros for the pruned modules'
LoRA factors (ΔW = 0; all-zero bytes are +0.0 in every float format). A DoRA module is
a no-op only when its magnitude vector equals the row norms of W0, so those are reset
too. ``drop`` mode removes the pruned modules' tensors, and for a PEFT directory adds
them to ``exclude_modules`` in ``adapter_config.json`` so PEFT does not expect them; the
base layer PEFT saves with some modules (``<module>.base_layer.weight``, of a targeted
embedding) is kept under the name PEFT gives it when the module is not a target
(``<module>.weight``), so that PEFT loads it into the unwrapped module.

Tensors stream from the source file's memory map to the output, in the source's order,
one chunk at a time; untouched tensors are copied byte for byte.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._version import __version__
from .errors import InputError, UsageError
from .io.adapterdir import write_directory
from .io.reader import SafetensorsFile, sha256, stored_as
from .io.writer import SafetensorsEntry, literal, write_safetensors
from .lora import Adapter, module_keys
from .options import OptionError

__all__ = ["rewrite_adapter", "MODES"]

MODES = ("zero", "drop", "project")
_CHUNK = 1 << 22


def _copy_chunks(file: SafetensorsFile, name: str):
    return lambda: file.chunks(name, _CHUNK)


def _zero_chunks(nbytes: int):
    def chunks():
        left = nbytes
        while left:
            n = min(_CHUNK, left)
            left -= n
            yield bytes(n)

    return chunks


def _array_chunks(array: np.ndarray):
    return lambda: iter([np.ascontiguousarray(array).tobytes()])


def _entries(file: SafetensorsFile, zeroed: set[str], dropped: set[str], replaced: dict[str, np.ndarray],
             renamed: dict[str, str]):
    entries = []
    for info in sorted(file.tensors.values(), key=lambda i: i.start):
        if info.name in dropped:
            continue
        nbytes = info.end - info.start
        if info.name in replaced:
            value = stored_as(replaced[info.name], info.dtype).reshape(info.shape)
            source = _array_chunks(value)
        elif info.name in zeroed:
            source = _zero_chunks(nbytes)
        else:
            source = _copy_chunks(file, info.name)
        entries.append(SafetensorsEntry(renamed.get(info.name, info.name), info.dtype, info.shape, nbytes, source))
    return entries


def _exclude(config: dict | None, names: list[str]) -> dict | None:
    """Add ``names`` (full module paths) to PEFT's ``exclude_modules`` (None: no config, or
    MLX-LM's, whose loader keeps a module with no tensors in the file at its initial, zero
    update: lora_b starts at zeros and DoRA's m at W0's row norms)."""
    if config is None or "lora_parameters" in config:
        return None
    config = dict(config)
    current = config.get("exclude_modules")  # a str or a list of str (lora.CONFIG_SCHEMA)
    if isinstance(current, str):
        config["exclude_modules"] = "|".join([f"(?:{current})", *(re.escape(n) for n in names)])
    else:
        config["exclude_modules"] = sorted(set(current or []) | set(names))
    return config


def _unwrapped(file: SafetensorsFile, factors: list[str]) -> dict[str, str]:
    """The keys under a module's ``base_layer.`` (PEFT's wrapper), each to its name without
    the wrapper: ``<module>.base_layer.weight`` → ``<module>.weight``."""
    module = os.path.commonprefix(factors).rpartition(".")[0] + "."
    wrapped = module + "base_layer."
    renamed = {key: module + key[len(wrapped):] for key in file.keys() if key.startswith(wrapped)}
    for old, new in renamed.items():
        if new in file.tensors:
            raise InputError(f"{file.path}: holds both {old} and {new}")
    return renamed


def rewrite_adapter(adapter: Adapter, pruned: list[str], output, *, mode: str = "zero",
                    replacements: dict[str, np.ndarray] | None = None, metadata: dict[str, str] | None = None,
                    force: bool = False) -> dict:
    """Write ``adapter`` with the updates of the modules named in ``pruned`` removed
    (``zero``, ``drop``) or replaced (``project``: SafeLoRA's lora_B ← C·lora_B).

    Parameters
    ----------
    adapter : Adapter
    pruned : list of str
        Module names, as in the report.
    output : path-like
        A directory when ``adapter.path`` is a PEFT directory, else a file.
    mode : {"zero", "drop", "project"}
    replacements : dict, optional
        Key → new value, written in the key's dtype: for DoRA modules in zero mode, the
        magnitude key → row norms of W0; in project mode, each pruned module's lora_B.
    metadata : dict of str, optional
        Added to the file's ``__metadata__`` (which is otherwise kept).
    force : bool
        Replace an existing output.

    Returns
    -------
    dict
        ``parameters_total``, ``parameters_removed`` (LoRA factor entries), the keys
        zeroed, dropped or replaced, ``renamed`` (old key → new key, drop mode), and
        ``warnings``: the entries of the adapter directory not copied, and why.
    """
    if mode not in MODES:
        raise OptionError(f"{{mode}} must be one of {', '.join(MODES)}", "mode")
    file = adapter.file
    keys = module_keys(file)
    unknown = [n for n in pruned if n not in keys]
    if unknown:
        raise InputError(f"{file.path}: has no LoRA module {unknown[0]!r} (named by the selection)")
    plan = _plan(file, keys, pruned, mode, replacements or {})
    if mode == "drop":
        _check_drop(file, len(pruned) == len(keys))
    factor_keys = {k for ks in keys.values() for k in ks["factors"]}
    total = sum(file.tensors[k].numel for k in factor_keys)
    removed = 0 if mode == "project" else sum(file.tensors[k].numel for n in pruned for k in keys[n]["factors"])
    meta = _metadata(file, mode, pruned, metadata)
    entries = _entries(file, plan.zeroed, plan.dropped, plan.replaced, plan.renamed)
    warnings = _write(adapter, Path(output), entries, meta, _exclude(adapter.config, pruned) if mode == "drop" else None,
                      force)
    return {
        "warnings": warnings,
        "parameters_total": total,
        "parameters_removed": removed,
        "zeroed": sorted(plan.zeroed),
        "replaced": sorted(plan.replaced),
        "dropped": sorted(plan.dropped),
        "renamed": dict(sorted(plan.renamed.items())),
    }


def _check_drop(file: SafetensorsFile, every_module: bool) -> None:
    """Drop mode must leave a module, and cannot drop VeRA's (PEFT would not load the result)."""
    if every_module:
        raise OptionError("{mode} drop would remove every LoRA module; use {mode} zero", "mode")
    if any(k.rsplit(".", 1)[-1].startswith("vera_lambda_") for k in file.keys()):
        raise OptionError("{mode} drop cannot remove a VeRA module (VeraConfig has no exclude_modules, and PEFT sizes "
                          "the shared vera_A/vera_B from the targeted modules); use {mode} zero", "mode")


def _write(adapter: Adapter, output: Path, entries, meta: dict[str, str], config: dict | None, force: bool) -> list[str]:
    """The rewritten weights as a file, or in a copy of the adapter's directory (with
    ``config`` as its adapter_config.json, when given); the directory's warnings."""
    if not adapter.path.is_dir():
        write_safetensors(output, entries, meta, force=force)
        return []
    data = None if config is None else (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    return write_directory(adapter.path, adapter.file, output, entries, meta, data, force)


@dataclass
class _Plan:
    """What happens to the adapter's tensors: zeroed, dropped, replaced (key → new value) or
    renamed (old key → new key)."""

    zeroed: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)
    replaced: dict[str, np.ndarray] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)


def _plan(file: SafetensorsFile, keys: dict, pruned: list[str], mode: str, replacements: dict) -> _Plan:
    plan = _Plan()
    for name in pruned:
        factors, extra = keys[name]["factors"], keys[name]["extra"]
        if mode == "drop":
            plan.dropped.update(factors + extra)
            plan.renamed.update(_unwrapped(file, factors))
        elif mode == "project":
            new = [k for k in factors if k in replacements]
            if len(new) != 1:
                raise OptionError(f"{literal(name)}: {{mode}} project needs the projected factor of this module", "mode")
            plan.replaced[new[0]] = replacements[new[0]]
        else:
            plan.zeroed.update(factors)
            plan.replaced.update(_magnitudes(extra, replacements))
    return plan


def _magnitudes(extra: list[str], replacements: dict) -> dict[str, np.ndarray]:
    """Zero mode: a DoRA magnitude is reset to W0's norms, which the caller gives."""
    out = {}
    for key in extra:
        if key.endswith(("lora_magnitude_vector", "lora_magnitude_vector.weight", "dora_scale", ".m")):  # .m: MLX-LM
            if key not in replacements:
                raise UsageError(f"{key}: pruning a DoRA module in zero mode needs the base (to reset its magnitude)")
            out[key] = replacements[key]
    return out


def _metadata(file: SafetensorsFile, mode: str, pruned: list[str], metadata: dict[str, str] | None) -> dict[str, str]:
    """The source's ``__metadata__`` with ddiscan's record of the rewrite (and ``metadata``)."""
    meta = dict(file.metadata or {})
    meta.update({
        "ddiscan.version": __version__,
        "ddiscan.mode": mode,
        "ddiscan.pruned": json.dumps(sorted(pruned)),
        "ddiscan.source_sha256": sha256(file),
        **(metadata or {}),
    })
    return meta
