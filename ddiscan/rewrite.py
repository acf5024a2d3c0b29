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
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np

from ._version import __version__
from .errors import InputError, OutputError, UsageError
from .io.reader import SafetensorsFile, note_input, open_regular, sha256, stored_as
from .io.writer import (
    OLD_SUFFIX, TEMP_SUFFIX, SafetensorsEntry, _resolve, check_output, default_mode, fsync_directory,
    remove_stale_temps, temp_prefix, write_atomic, write_safetensors,
)
from .lora import Adapter, module_keys

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


def _exclude(config: dict, names: list[str]) -> dict:
    """Add ``names`` (full module paths) to PEFT's ``exclude_modules``."""
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
        raise UsageError(f"--mode must be one of {', '.join(MODES)}")
    file = adapter.file
    keys = module_keys(file)
    unknown = [n for n in pruned if n not in keys]
    if unknown:
        raise InputError(f"{file.path}: has no LoRA module {unknown[0]!r} (named by the selection)")
    factor_keys = {k for ks in keys.values() for k in ks["factors"]}
    zeroed, dropped, replaced, renamed = set(), set(), {}, {}
    replacements = replacements or {}
    for name in pruned:
        if mode == "drop":
            dropped.update(keys[name]["factors"] + keys[name]["extra"])
            renamed.update(_unwrapped(file, keys[name]["factors"]))
        elif mode == "project":
            new = [k for k in keys[name]["factors"] if k in replacements]
            if len(new) != 1:
                raise UsageError(f"{name}: --mode project needs the projected factor of this module")
            replaced[new[0]] = replacements[new[0]]
        else:
            zeroed.update(keys[name]["factors"])
            for key in keys[name]["extra"]:
                if key.endswith(("lora_magnitude_vector", "lora_magnitude_vector.weight", "dora_scale")):
                    if key not in replacements:
                        raise UsageError(f"{key}: pruning a DoRA module in zero mode needs the base (to reset its magnitude)")
                    replaced[key] = replacements[key]
    if mode == "drop" and len(pruned) == len(keys):
        raise UsageError("--mode drop would remove every LoRA module; use --mode zero")
    total = sum(file.tensors[k].numel for k in factor_keys)
    removed = 0 if mode == "project" else sum(file.tensors[k].numel for n in pruned for k in keys[n]["factors"])

    meta = dict(file.metadata or {})
    meta.update({
        "ddiscan.version": __version__,
        "ddiscan.mode": mode,
        "ddiscan.pruned": json.dumps(sorted(pruned)),
        "ddiscan.source_sha256": sha256(file),
        **(metadata or {}),
    })
    entries = _entries(file, zeroed, dropped, replaced, renamed)
    output = Path(output)
    warnings = []
    if adapter.path.is_dir():
        warnings = _write_directory(adapter, output, entries, meta, mode, pruned, force)
    else:
        write_safetensors(output, entries, meta, force=force)
    return {
        "warnings": warnings,
        "parameters_total": total,
        "parameters_removed": removed,
        "zeroed": sorted(zeroed),
        "replaced": sorted(replaced),
        "dropped": sorted(dropped),
        "renamed": dict(sorted(renamed.items())),
    }


def _write_directory(adapter: Adapter, output: Path, entries, meta, mode, pruned, force: bool) -> list[str]:
    """Build the output directory beside its final place, then rename it into place.
    Returns a warning for each entry of the adapter directory that is not copied."""
    output = Path(os.path.abspath(output))
    check_output(output, [adapter.path], replaces_directory=True)
    if _resolve(Path.cwd()).is_relative_to(_resolve(output)):
        raise UsageError(f"{output}: is the current directory (or holds it); choose another output")
    if output.exists() and not force:
        raise UsageError(f"{output}: exists (use --force to replace it)")
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output}: exists and is not a directory")
    sources, warnings = _sources(adapter)
    names = sorted([*(item.name for item in sources), adapter.file.path.name])
    if output.exists():
        _check_replaceable(output, adapter.file.path.name)
    meta = {**meta, "ddiscan.files": json.dumps(names)}
    parent = output.parent
    remove_stale_temps(output)
    try:
        staging = Path(tempfile.mkdtemp(prefix=temp_prefix(output), suffix=TEMP_SUFFIX, dir=parent))
        os.chmod(staging, default_mode(directory=True))
    except OSError as exc:
        raise OutputError(f"{output}: cannot write ({exc.strerror or exc})") from None
    old = None
    try:
        for item in sources:
            if item.name == "adapter_config.json" and mode == "drop" and adapter.config is not None:
                config = _exclude(adapter.config, pruned)
                write_atomic(staging / item.name, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
                continue
            _copy_file(item, staging / item.name)
        write_safetensors(staging / adapter.file.path.name, entries, meta)
        check_output(output, [adapter.path], replaces_directory=True)  # the inputs unchanged, just before
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(output), suffix=OLD_SUFFIX, dir=parent))
            os.replace(output, old / output.name)
            os.replace(staging, output)
            shutil.rmtree(old)
        else:
            os.replace(staging, output)
        fsync_directory(parent)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not os.path.lexists(old / output.name):
            shutil.rmtree(old, ignore_errors=True)  # empty: the swap did not begin
        if isinstance(exc, OSError):
            raise OutputError(f"{output}: cannot write ({exc.strerror or exc})") from None
        raise
    return warnings


def _sources(adapter: Adapter) -> tuple[list[Path], list[str]]:
    """The files of a PEFT directory copied beside the rewritten weights, and a warning for
    each entry passed over: only regular files that belong to the adapter are copied: a
    symbolic link is followed only to a regular file inside the adapter directory, and a
    device, FIFO or socket is never opened (subdirectories are not copied, as before)."""
    root = _resolve(adapter.path)
    sources, warnings = [], []
    for item in sorted(adapter.path.iterdir()):
        if item.name == adapter.file.path.name:
            continue
        if item.is_symlink() and not _resolve(item).is_relative_to(root):
            if item.name == "adapter_config.json":
                raise InputError(f"{item}: a symbolic link out of the adapter directory; ddiscan copies only "
                                 "the adapter's own files (copy the directory with its links resolved: cp -rL)")
            warnings.append(f"{item}: a symbolic link out of the adapter directory; not copied")
            continue
        try:
            mode = os.stat(item).st_mode
        except OSError:
            warnings.append(f"{item}: a dangling symbolic link; not copied")
            continue
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            warnings.append(f"{item}: not a regular file (a device, FIFO or socket); not copied")
            continue
        sources.append(item)
    return sources, warnings


def _copy_file(source: Path, target: Path) -> None:
    """Copy a regular file (opened as one: it cannot turn into a FIFO or device between the
    listing and the copy) with its permissions and times, and fsync the copy."""
    with os.fdopen(open_regular(source), "rb") as src:
        st = os.fstat(src.fileno())
        note_input(source, st)
        with open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
            dst.flush()
            os.fsync(dst.fileno())
    os.chmod(target, stat.S_IMODE(st.st_mode))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def _check_replaceable(output: Path, weights: str) -> None:
    """UsageError unless ``output`` is a directory ddiscan wrote: its weights file carries
    ddiscan's metadata, whose ``ddiscan.files`` lists every entry the directory holds, each
    a regular file. ``--force`` never removes anything else."""
    def refuse(why: str):
        raise UsageError(f"{output}: exists and {why}; --force replaces only an adapter directory ddiscan wrote "
                         "(choose another output)")

    try:
        meta = SafetensorsFile(output / weights, record=False).metadata or {}
        written = json.loads(meta["ddiscan.files"])
    except (InputError, KeyError, ValueError):
        refuse(f"is not an output of ddiscan prune (no {weights} with ddiscan's list of the files it wrote)")
    if "ddiscan.version" not in meta or not isinstance(written, list):
        refuse(f"is not an output of ddiscan prune (no {weights} with ddiscan's list of the files it wrote)")
    for item in sorted(output.iterdir()):
        if item.name not in written or item.is_symlink() or not item.is_file():
            refuse(f"holds {item.name}, which ddiscan did not write")
