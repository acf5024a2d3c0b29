"""Scan (or read an earlier report), select modules, and write the pruned adapter."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError, ShapeMismatch, UsageError
from .io.index import TensorIndex
from .io.quantindex import open_checkpoint
from . import safelora
from .io.convert import frobenius
from .io.jsonfile import read_json
from .options import OptionError
from .lora import Adapter, base_matrix, load_adapter, lora_factors, match_modules, orient
from .report import SCORES, ModuleScore, Report
from .rewrite import rewrite_adapter
from .io.reader import sha256
from .io.writer import literal
from .scan import scan
from .sources import alignment_update as _alignment_update
from .sources.gguf import open_weights
from .select import Selection, select

__all__ = ["PruneResult", "prune", "load_report"]


@dataclass
class PruneResult:
    """The scan, the selection, and what the rewrite removed (None for a dry run)."""

    report: Report
    selection: Selection
    mode: str
    written: dict | None

    def to_dict(self) -> dict:
        data = self.report.to_dict()
        pruned = set(self.selection.names)
        for row in data["modules"]:
            row["action"] = "pruned" if row["name"] in pruned else "kept"
        data["selection"] = {
            "rule": self.selection.rule, "value": self.selection.value, "mode": self.mode,
            "pruned": self.selection.names, "dry_run": self.written is None,
        }
        if self.written is not None:
            total, removed = self.written["parameters_total"], self.written["parameters_removed"]
            data["selection"].update(
                parameters_total=total, parameters_removed=removed,
                percent_parameters_removed=100.0 * removed / total if total else 0.0,
            )
        return data


def load_report(path, adapter: Adapter) -> Report:
    """An earlier JSON report, checked against the adapter now on disk (size and sha256)."""
    try:
        data = read_json(path, "a ddiscan JSON report")
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{path}: not a ddiscan JSON report ({exc})") from None
    problem = _report_problem(data)
    if problem is not None:
        raise InputError(f"{path}: not a ddiscan JSON report ({problem})")
    report = Report.from_dict(data)
    recorded = data["inputs"]["adapter"]
    file = adapter.file.path
    if recorded.get("size") != adapter.file.size or recorded.get("sha256") != sha256(adapter.file):
        raise InputError(f"{path}: was made from a different adapter than {file} (size or sha256 differ); scan again")
    return report


_NUMBER_FIELDS = ("sharpness", "deviation", "magnitude", "magnitude_norm", "ddi", "ddi_raw", "ddi_norm",
                  "delta_norm", "base_norm", "cosine", "ediem", "scale")
_INT_FIELDS = ("d", "k", "r", "t")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _report_problem(data) -> str | None:
    """What makes ``data`` unusable as a report to prune from (None when nothing does):
    every field selection and rewriting read, with its JSON type."""
    problem = _header_problem(data)
    if problem is not None:
        return problem
    rows = data["modules"]
    required = {f.name for f in dataclasses.fields(ModuleScore) if f.default is dataclasses.MISSING}
    needed = (SCORES[data["method"]][0], *(("ddi_norm",) if data["method"] == "ddi" else ()))
    names: set[str] = set()
    for i, row in enumerate(rows):
        problem = _row_problem(row, required, needed, names)
        if problem is not None:
            return f"modules[{i}]{problem}"
        names.add(row["name"])
    return None


def _header_problem(data) -> str | None:
    """The report's top level: an object with a known method, its inputs, parameters and modules."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if data.get("method") not in SCORES:
        return f"unknown method {data.get('method')!r}"
    inputs = data.get("inputs")
    if not (isinstance(inputs, dict) and isinstance(inputs.get("adapter"), dict) and isinstance(inputs.get("base"), dict)
            and isinstance(inputs["adapter"].get("path"), str)):
        return "no inputs.adapter.path"
    if not isinstance(data.get("parameters"), dict):
        return "no parameters object"
    rows = data.get("modules")
    if not isinstance(rows, list) or not rows:
        return "no modules"
    return None


def _row_problem(row, required: set[str], needed: tuple[str, ...], names: set[str]) -> str | None:
    """What is wrong with one module row (the text after ``modules[i]``), or None."""
    if not isinstance(row, dict) or not required <= row.keys():
        return " is not a module row"
    if not isinstance(row["name"], str) or not isinstance(row["finite"], bool) or row["name"] in names:
        return ": name must be a unique string and finite a boolean"
    for name in _INT_FIELDS:
        if not (isinstance(row[name], int) and not isinstance(row[name], bool)):
            return f".{name} must be an integer"
    for name in _NUMBER_FIELDS:
        if row.get(name) is not None and not _is_number(row[name]):
            return f".{name} must be a finite number or null"
    if row["finite"] and any(row.get(name) is None for name in needed):
        return f": a finite module without its {'/'.join(needed)}"
    return None


def _dora_magnitudes(adapter: Adapter, base, names: set[str]) -> dict[str, np.ndarray]:
    """For the DoRA modules among ``names``, the magnitude that makes them a no-op: PEFT's
    weight norm of W0 (:func:`_dora_norm`), checked against the stored magnitude's size."""
    if base is None:
        return {}
    index = open_weights(base)
    modules, _, _ = match_modules(adapter, index, allow_unmatched=True)
    magnitudes = {}
    for m in modules:
        if m.name in names and m.dora_key:
            norm = _dora_norm(m, np.asarray(base_matrix(m, index), dtype=np.float64))
            stored = adapter.file.tensors[m.dora_key]
            if norm.size != stored.numel:
                raise ShapeMismatch(f"{m.dora_key}: holds {stored.numel} magnitudes, but W0 ({m.base_key}) "
                                    f"has {norm.size} {'columns' if m.layout == 'embedding' else 'rows'}")
            magnitudes[m.dora_key] = norm
    return magnitudes


def _dora_norm(module, w0: np.ndarray) -> np.ndarray:
    """PEFT's DoRA weight norm of W0 (``peft/tuners/lora/dora.py``), the d × k matrix as
    ddiscan orients it: one norm per output feature — a row of a Linear or Conv1D weight
    (after the Conv1D transpose), a flattened output channel of a convolution — but one
    per embedding dimension for an embedding (PEFT's ``DoraEmbeddingLayer`` norms the
    num_embeddings × dim weight over its tokens, with fan_in_fan_out), a column here."""
    return np.sqrt(np.sum(w0 * w0, axis=0 if module.layout == "embedding" else 1))


def _projections(adapter: Adapter, base, names: set[str], aligned, unaligned) -> dict[str, np.ndarray]:
    """SafeLoRA's rewrite for the modules in ``names``: lora_B ← C·lora_B, so ΔW ← C·ΔW."""
    if base is None or aligned is None or unaligned is None:
        raise OptionError("{mode} project needs {base}, {aligned} and {unaligned}", "mode", "base", "aligned", "unaligned")
    index = open_weights(base)
    pair = (TensorIndex(aligned), TensorIndex(unaligned))
    modules, _, _ = match_modules(adapter, index, allow_unmatched=True)
    replaced = {}
    for m in modules:
        if m.name not in names:
            continue
        if m.family is not None:  # C·ΔW of a Hadamard or Kronecker product is no longer one
            raise OptionError(f"{literal(m.name)}: {{mode}} project rewrites a LoRA lora_B; this is a {m.family} "
                              "module (use {mode} zero or drop)", "mode")
        diff = orient(m, _alignment_update(pair, m.base_key, index.info(m.base_key).shape))
        up, _ = lora_factors(m, adapter.file)
        projected = safelora.project_up(diff, up, diff_norm=frobenius(diff), xp=np)
        if m.layout == "embedding":  # up is lora_embedding_Aᵀ
            replaced[m.down_key] = np.asarray(projected).T
        elif m.transpose_factors:  # MLX-LM: lora_b is upᵀ
            replaced[m.up_key] = np.asarray(projected).T
        else:
            replaced[m.up_key] = np.asarray(projected).reshape(adapter.file.tensors[m.up_key].shape)
    return replaced


def prune(base, adapter, output=None, *, top=None, theta=None, theta_norm=None, mode: str = "zero",
          force: bool = False, dry_run: bool = False, from_report=None, **scan_options) -> PruneResult:
    """Select modules by one rule and write ``adapter`` with their updates removed.

    ``base`` may be None with ``from_report`` (the scores come from the report), unless a
    selected module is DoRA in zero mode. ``scan_options`` are passed to :func:`ddiscan.scan`.
    ``mode="project"`` is SafeLoRA's own rewrite (lora_B ← C·lora_B) and needs ``aligned``
    and ``unaligned`` among ``scan_options``.
    """
    if output is None and not dry_run:
        raise UsageError("give {output} (or {dry_run})", "output", "dry_run")
    adapter_obj = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    if from_report is not None:
        report = load_report(from_report, adapter_obj)
    elif base is None:
        raise OptionError("give {base}, or {from_report}", "base", "from_report")
    else:
        # the rule's options, checked before the scan
        select((), top=top, theta=theta, theta_norm=theta_norm, method=scan_options.get("method", "ddi"))
        report = scan(base, adapter_obj, **scan_options)
    selection = select(report.modules, top=top, theta=theta, theta_norm=theta_norm, method=report.method)
    if dry_run:
        return PruneResult(report, selection, mode, None)
    names = set(selection.names)
    if mode == "project":
        aligned = scan_options.get("aligned") or report.parameters.get("aligned")
        unaligned = scan_options.get("unaligned") or report.parameters.get("unaligned")
        keys_from = base if base is not None else report.inputs["base"]["path"]  # only its key listing
        replacements = _projections(adapter_obj, keys_from, names, aligned, unaligned)
    else:
        replacements = _dora_magnitudes(adapter_obj, base, names) if mode == "zero" else {}
    written = rewrite_adapter(
        adapter_obj, selection.names, output, mode=mode, replacements=replacements, force=force,
        metadata={"ddiscan.selection": json.dumps({"rule": selection.rule, "value": selection.value}),
                  "ddiscan.parameters": json.dumps(report.parameters, sort_keys=True)},
    )
    report.warnings.extend(written["warnings"])  # entries of the adapter directory not copied
    return PruneResult(report, selection, mode, written)
