"""Writing outputs so that nothing is lost: temp file, fsync, rename; never over an input."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import OutputError, UsageError

__all__ = ["write_atomic", "refuse_input_as_output"]


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def refuse_input_as_output(output, inputs) -> None:
    """UsageError when ``output`` is one of ``inputs`` or lies inside an input directory."""
    out = Path(output)
    for given in inputs:
        path = Path(given)
        if _same(out, path) or (path.is_dir() and out.resolve().is_relative_to(path.resolve())):
            raise UsageError(f"{output}: the output path is an input ({given}); choose another")


def write_atomic(path, data: bytes, *, force: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory.

    The temporary file is fsynced, then renamed over ``path``, then the directory is
    fsynced: a reader sees the old file or the complete new one, never a partial one.
    """
    path = Path(path)
    if not force and path.exists():
        raise UsageError(f"{path}: exists (use --force to replace it)")
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".ddiscan-tmp", dir=directory)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
