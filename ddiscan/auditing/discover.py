"""The adapters an audit's PATHs name: an adapter (file or PEFT directory), a directory
tree searched for adapters (a Hugging Face cache among them: each snapshot holding an
adapter is a PEFT directory), or ``@LIST``, a text file of such paths, one per line."""

from __future__ import annotations

import os
from pathlib import Path

from ..check import adapter_of
from ..errors import DdiscanError, InputError, printable

__all__ = ["discover"]


def discover(paths) -> tuple[list[str], list[str]]:
    """The adapters among ``paths`` (each once, in the order found) and a note for each
    file passed over. A path that does not exist, or a broken adapter, is kept: the audit
    records its error."""
    targets, notes = [], []
    for path in _expanded(paths):
        for found in _walk(path) if Path(path).is_dir() and not _is_peft_dir(Path(path)) else [path]:
            try:
                target, note = adapter_of(found)
            except DdiscanError:
                target, note = found, None  # a file the reader refuses: its error becomes the adapter's row
            if note is None:
                targets.append(target)
            else:
                notes.append(note)
    return list(dict.fromkeys(targets)), notes


def _expanded(paths) -> list[str]:
    """``paths`` with each ``@LIST`` replaced by the paths it lists (blank lines and lines
    starting with ``#`` skipped; relative paths are taken from the list's directory)."""
    out = []
    for path in map(os.fspath, paths):
        if not path.startswith("@"):
            out.append(path)
            continue
        listing = Path(path[1:])
        try:
            lines = listing.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{printable(listing)}: cannot read the list of adapters ({exc})") from None
        out += [os.path.join(listing.parent, line.strip()) for line in lines
                if line.strip() and not line.lstrip().startswith("#")]
    return out


def _is_peft_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def _walk(root: str) -> list[str]:
    """Every candidate adapter under ``root``, sorted: each PEFT directory's config, and
    each ``.safetensors`` file outside one; links to directories are not followed."""
    found = []
    for directory, dirs, files in os.walk(root, onerror=_unreadable):
        dirs.sort()
        if "adapter_config.json" in files:
            found.append(os.path.join(directory, "adapter_config.json"))
            continue
        found += [os.path.join(directory, f) for f in sorted(files) if f.endswith(".safetensors")]
    return found


def _unreadable(exc: OSError):
    raise InputError(f"{printable(exc.filename)}: cannot list the directory ({exc.strerror or exc})")
