"""Writing outputs so that nothing is lost: temp file, fsync, rename; never over an input."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputError, UsageError
from ..options import OptionError
from .reader import inputs_read

__all__ = [
    "default_mode", "write_atomic", "write_atomic_stream", "refuse_input_as_output", "SafetensorsEntry",
    "write_safetensors", "safetensors_header", "temp_prefix", "remove_stale_temps", "fsync_directory",
    "refuse_special_output", "refuse_same_outputs", "check_output",
]


def default_mode(directory: bool = False) -> int:
    """The permissions a new file (or directory) gets under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


TEMP_SUFFIX = ".ddiscan-tmp"
OLD_SUFFIX = ".ddiscan-old"


def temp_prefix(path: Path) -> str:
    """Prefix of the temporary files (and directories) beside ``path``: it names this
    process's id, so that a later run can tell a dead writer's leftovers from a live one's."""
    return f".{path.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: the process exists but belongs to someone else
        return True
    return True


def remove_stale_temps(path) -> list[Path]:
    """Remove the temporaries a killed writer of ``path`` left beside it.

    A temporary ``.NAME.PID.XXXX.ddiscan-tmp`` (file or directory) is removed when process
    PID is gone; one of a live process is left alone, as are names without a pid. A
    ``.ddiscan-old`` directory (the previous output of a directory being replaced) is removed
    only once ``path`` itself exists again, so an interrupted swap never loses the only copy.
    Failures are ignored: cleaning up is best effort and must not stop the write.

    Returns
    -------
    list of Path
        The entries removed.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    start = f".{path.name}."
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(start) or not name.endswith((TEMP_SUFFIX, OLD_SUFFIX)):
            continue
        pid = name[len(start):].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if name.endswith(OLD_SUFFIX) and not os.path.lexists(path):
            continue
        stale = directory / name
        try:
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        except OSError:
            continue
        removed.append(stale)
    return removed


def resolve(path: Path) -> Path:
    """``path.resolve()``, or the absolute path where links loop (Python < 3.13 raises
    RuntimeError there, later ones OSError)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def _same(a: Path, b: Path) -> bool:
    try:
        return resolve(a) == resolve(b) or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def refuse_input_as_output(output, inputs, *, replaces_directory: bool = False) -> None:
    """UsageError when ``output`` is one of ``inputs`` (by resolved path or by inode), lies
    inside an input directory, or is a special file (:func:`refuse_special_output`); with
    ``replaces_directory`` (an output directory replaced whole), also when an input lies
    inside ``output``."""
    out = Path(output)
    refuse_special_output(out)
    for given in inputs:
        path = Path(given)
        if (
            _same(out, path) or (path.is_dir() and resolve(out).is_relative_to(resolve(path)))
            or (replaces_directory and resolve(path).is_relative_to(resolve(out)))
        ):
            raise UsageError(f"{output}: the output path is an input ({given}); choose another")


def refuse_special_output(output) -> None:
    """UsageError when ``output`` exists (through a symbolic link too) and is neither a
    regular file nor a directory: a device, FIFO or socket is never replaced or opened."""
    try:
        mode = os.stat(output).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UsageError(f"{output}: is a device, FIFO or socket, not a regular file; ddiscan writes regular files only")


def refuse_same_outputs(outputs: dict) -> None:
    """UsageError when two of ``outputs`` (option → path or None) are the same file."""
    given = [(option, path) for option, path in outputs.items() if path is not None]
    for i, (option, path) in enumerate(given):
        for other, other_path in given[:i]:
            if _same(Path(path), Path(other_path)):
                raise UsageError(f"{path}: given as both {other} and {option}; each output needs its own path")


def check_output(output, extra_inputs=(), *, replaces_directory: bool = False) -> None:
    """Before ``output`` is written: refuse it when it is a special file or any file read
    so far (:func:`~ddiscan.io.reader.inputs_read`: shards, configs, profiles, reports...,
    plus ``extra_inputs``), and make sure every input still held open is unchanged."""
    records = inputs_read()
    refuse_input_as_output(output, [*(r.path for r in records), *extra_inputs],
                           replaces_directory=replaces_directory)
    try:
        st = os.stat(output)
    except OSError:
        st = None
    for record in records:
        if st is not None and (st.st_dev, st.st_ino) == (record.dev, record.ino):
            raise UsageError(f"{output}: the output path is an input ({record.path}); choose another")
        if record.file is not None:
            record.file.check_unchanged()


def literal(text) -> str:
    """``text`` as it reads in an :class:`~ddiscan.options.OptionError` template (braces
    doubled: a path or key is shown as is, never read as a parameter's place)."""
    return str(text).replace("{", "{{").replace("}", "}}")


def write_atomic(path, data: bytes, *, force: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`write_atomic_stream`)."""
    write_atomic_stream(path, lambda f: f.write(data), force=force)


def write_atomic_stream(path, fill, *, force: bool = True) -> None:
    """Write to ``path`` through a temporary file in the same directory.

    ``fill(f)`` writes the content to the binary file object ``f``. The temporary file is
    fsynced, then renamed over ``path``, then the directory is fsynced: a reader sees the
    old file or the complete new one, never a partial one, and a failure leaves no
    temporary file behind. Temporaries of ``path`` left by a killed writer are removed
    first (:func:`remove_stale_temps`).
    """
    path = Path(path)
    check_output(path)
    if not force and path.exists():
        raise OptionError(f"{literal(path)}: exists (use {{force}} to replace it)", "force")
    if path.is_dir():
        raise OutputError(f"{path}: cannot write (is a directory)")
    directory = path.parent if str(path.parent) else Path(".")
    remove_stale_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=TEMP_SUFFIX, dir=directory)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        os.chmod(tmp, default_mode())
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise
    fsync_directory(directory)


def fsync_directory(directory) -> None:
    """Make a rename in ``directory`` durable (best effort: not every filesystem can)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor to write: ``chunks()`` yields its bytes, ``nbytes`` in all."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: Callable[[], Iterable[bytes]]


def safetensors_header(entries, metadata: dict[str, str] | None) -> bytes:
    """The length prefix and the JSON header of a safetensors file holding ``entries`` in
    the order given, padded with spaces to a multiple of 8 bytes, as the safetensors
    library writes it."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path, entries, metadata: dict[str, str] | None, *, force: bool = True) -> None:
    """Stream tensors into a safetensors file, in the order given, atomically.

    Only one chunk of one tensor is in memory at a time.
    """
    header = safetensors_header(entries, metadata)

    def fill(f):
        f.write(header)
        for e in entries:
            written = 0
            for chunk in e.chunks():
                f.write(chunk)
                written += len(chunk)
            if written != e.nbytes:
                raise OutputError(f"{path}: tensor {e.name!r} produced {written} bytes, expected {e.nbytes}")

    write_atomic_stream(path, fill, force=force)
