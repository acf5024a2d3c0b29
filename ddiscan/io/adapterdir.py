"""Writing an adapter directory (PEFT's layout) as a whole: built beside its final place,
then renamed into place, so that a reader sees the old directory or the new one, never a
mix. Only the adapter's own regular files are copied beside the rewritten weights, and an
existing output is replaced only when ddiscan wrote it (its ``ddiscan.files`` list).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

from ..errors import InputError, OutputError, UsageError
from ..options import OptionError
from .reader import SafetensorsFile, note_input, open_regular
from .writer import (
    OLD_SUFFIX, TEMP_SUFFIX, check_output, default_mode, fsync_directory, literal, remove_stale_temps, resolve,
    temp_prefix, write_atomic, write_safetensors,
)

__all__ = ["write_directory"]

_CHUNK = 1 << 22


def write_directory(adapter_dir: Path, weights: SafetensorsFile, output: Path, entries, meta: dict[str, str],
                    config: bytes | None, force: bool) -> list[str]:
    """Write the directory ``adapter_dir`` to ``output`` with ``entries`` as its weights file
    (``meta`` its ``__metadata__``) and ``config``, when given, as its adapter_config.json.
    Returns a warning for each entry of the adapter directory that is not copied."""
    output = Path(os.path.abspath(output))
    _check_target(adapter_dir, output, force)
    sources, warnings = _sources(adapter_dir, weights.path.name)
    if output.exists():
        _check_replaceable(output, weights.path.name)
    names = sorted([*(item.name for item in sources), weights.path.name])
    meta = {**meta, "ddiscan.files": json.dumps(names)}
    remove_stale_temps(output)
    try:
        staging = Path(tempfile.mkdtemp(prefix=temp_prefix(output), suffix=TEMP_SUFFIX, dir=output.parent))
        os.chmod(staging, default_mode(directory=True))
    except OSError as exc:
        raise OutputError(f"{output}: cannot write ({exc.strerror or exc})") from None
    old = []
    try:
        _fill(staging, sources, weights.path.name, entries, meta, config)
        check_output(output, [adapter_dir], replaces_directory=True)  # the inputs unchanged, just before
        _swap_into_place(staging, output, old)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if old and not os.path.lexists(old[0] / output.name):
            shutil.rmtree(old[0], ignore_errors=True)  # empty: the swap did not begin
        if isinstance(exc, OSError):
            raise OutputError(f"{output}: cannot write ({exc.strerror or exc})") from None
        raise
    return warnings


def _check_target(adapter_dir: Path, output: Path, force: bool) -> None:
    """UsageError unless ``output`` may be written (or, with ``force``, replaced)."""
    check_output(output, [adapter_dir], replaces_directory=True)
    if resolve(Path.cwd()).is_relative_to(resolve(output)):
        raise UsageError(f"{output}: is the current directory (or holds it); choose another output")
    if output.exists() and not force:
        raise OptionError(f"{literal(output)}: exists (use {{force}} to replace it)", "force")
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output}: exists and is not a directory")


def _fill(staging: Path, sources: list[Path], weights: str, entries, meta: dict[str, str], config: bytes | None) -> None:
    for item in sources:
        if item.name == "adapter_config.json" and config is not None:
            write_atomic(staging / item.name, config)
        else:
            _copy_file(item, staging / item.name)
    write_safetensors(staging / weights, entries, meta)


def _swap_into_place(staging: Path, output: Path, old: list[Path]) -> None:
    """Rename ``staging`` to ``output``; an existing ``output`` is moved aside (into ``old[0]``)
    first and removed after."""
    parent = output.parent
    if output.exists():
        old.append(Path(tempfile.mkdtemp(prefix=temp_prefix(output), suffix=OLD_SUFFIX, dir=parent)))
        os.replace(output, old[0] / output.name)
        os.replace(staging, output)
        shutil.rmtree(old[0])
    else:
        os.replace(staging, output)
    fsync_directory(parent)


def _sources(adapter_dir: Path, weights: str) -> tuple[list[Path], list[str]]:
    """The files of a PEFT directory copied beside the rewritten weights, and a warning for
    each entry passed over: only regular files that belong to the adapter are copied: a
    symbolic link is followed only to a regular file inside the adapter directory, and a
    device, FIFO or socket is never opened (subdirectories are not copied, as before)."""
    roots = _own_roots(adapter_dir)
    sources, warnings = [], []
    for item in sorted(adapter_dir.iterdir()):
        if item.name == weights:
            continue
        if item.is_symlink() and not any(resolve(item).is_relative_to(root) for root in roots):
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


def _own_roots(adapter_dir: Path) -> tuple[Path, ...]:
    """Where the adapter's own files may lie: its directory, and, for a snapshot in the
    Hugging Face cache (``models--ORG--NAME/snapshots/REVISION``, whose files are links
    into ``models--ORG--NAME/blobs/``), that repository's blobs."""
    root = resolve(adapter_dir)
    repo = root.parent.parent
    if root.parent.name == "snapshots" and repo.name.startswith("models--") and (repo / "blobs").is_dir():
        return root, resolve(repo / "blobs")
    return (root,)


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
        raise OptionError(f"{literal(output)}: exists and {literal(why)}; {{force}} replaces only an adapter "
                          "directory ddiscan wrote (choose another output)", "force")

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
