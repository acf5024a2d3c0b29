"""The files a command reads: opened as regular files only, and recorded.

Every input is opened by :func:`open_regular` (a FIFO, device or socket is refused without
blocking) and recorded by :func:`note_input` in every active :func:`collecting_inputs`, so
that no output is written over any of them (:func:`ddiscan.io.writer.check_output`).
"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["open_regular", "InputRecord", "note_input", "collecting_inputs", "inputs_read"]


def open_regular(path, *, follow: bool = True) -> int:
    """A read-only descriptor of ``path``, which must be a regular file.

    Opened with ``O_NONBLOCK`` so that a FIFO never blocks the open, then checked with
    ``fstat`` (the file opened, not the name, so no race): a FIFO, device, socket or
    directory is an :class:`InputError`, as is a symbolic link when ``follow`` is False.
    The descriptor is blocking again when returned.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory") from None
    except OSError as exc:
        if not follow and os.path.islink(path):
            raise InputError(f"{path}: is a symbolic link") from None
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise InputError(f"{path}: is a directory")
        raise InputError(f"{path}: not a regular file (a FIFO, device or socket); ddiscan reads regular files only")
    os.set_blocking(fd, True)
    return fd


@dataclass(frozen=True)
class InputRecord:
    """A file a command read: its path and identity when it was opened; ``file`` is the
    :class:`SafetensorsFile` that still holds it open (None for a file read whole)."""

    path: Path
    dev: int
    ino: int
    size: int
    mtime_ns: int
    file: Any = None


_COLLECTIONS: list[list[InputRecord]] = []  # one per active collecting_inputs(), shared by threads


def note_input(path, st: os.stat_result | None = None, file: Any = None) -> None:
    """Record that ``path`` (with ``os.stat`` result ``st``) was read, in every active
    :func:`collecting_inputs`; outputs are then checked against it before they are written."""
    if not _COLLECTIONS:
        return
    if st is None:
        try:
            st = os.stat(path)
        except OSError:
            return
    record = InputRecord(Path(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, file)
    for collection in _COLLECTIONS:
        collection.append(record)


@contextmanager
def collecting_inputs():
    """Collect the files read inside the ``with`` block (:func:`note_input`, every
    :class:`SafetensorsFile` opened); yields the list. The command line runs each command
    in one."""
    collection: list[InputRecord] = []
    _COLLECTIONS.append(collection)
    try:
        yield collection
    finally:
        _COLLECTIONS.remove(collection)


def inputs_read() -> list[InputRecord]:
    """The files read so far in the innermost active :func:`collecting_inputs` (none outside one)."""
    return list(_COLLECTIONS[-1]) if _COLLECTIONS else []
