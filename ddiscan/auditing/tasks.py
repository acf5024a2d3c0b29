"""What runs on a Dask worker: each task gets file paths, keys and options (never arrays or
memory maps), opens the files itself, and returns plain values: a base weight's sketch, or
an adapter's row for the database. A task never raises for a bad adapter: ddiscan's
one-line message becomes the row's ``error``."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .._version import __version__
from ..errors import DdiscanError, printable
from ..io.reader import sha256

__all__ = ["sketch_keys", "score_adapter", "adapter_files", "file_state", "identity", "module_row"]

_PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
_PROFILES: dict = {}  # this worker's opened profiles, by (path, sha256)


def sketch_keys(base: str, keys: list[str], max_t: int, sketch: dict) -> dict:
    """The profile arrays (:func:`ddiscan.profile.sketch_weight`) of ``keys`` of ``base``."""
    from ..profile import sketch_weight
    from ..sketch import Sketch
    from ..sources.gguf import open_weights

    how = Sketch(**sketch)
    index = open_weights(base, how)
    return {key: sketch_weight(index, key, max_t, how) for key in keys}


def adapter_files(path: str) -> list[Path]:
    """The files an adapter's scores depend on: its weights, and a PEFT directory's config."""
    p = Path(path)
    if not p.is_dir():
        return [p]
    weights = next((p / n for n in _PEFT_WEIGHTS if (p / n).exists()), p / _PEFT_WEIGHTS[0])
    config = p / "adapter_config.json"
    return [weights, config] if config.exists() else [weights]


def file_state(path: Path) -> tuple[str, int, int] | None:
    """(path, size, mtime_ns) of a regular file, None for anything else or an unreadable one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (str(path), st.st_size, st.st_mtime_ns) if os.path.isfile(path) else None


def identity(digests, path: str, base: str | None, parameters: str) -> str:
    """A row's key: the sha256 of its files' digests (its path when they cannot be read),
    its base's fingerprint and its parameters."""
    what = list(digests) if digests else ["path:" + os.path.abspath(path)]
    return hashlib.sha256(json.dumps([what, base or "", parameters]).encode()).hexdigest()


def _digests(path: str) -> list[tuple[str, int, int, str]] | None:
    """(path, size, mtime_ns, sha256) of each of the adapter's files, None if one cannot be read."""
    out = []
    for file in adapter_files(path):
        state = file_state(file)
        if state is None:
            return None
        try:
            out.append((*state, sha256(file)))
        except (DdiscanError, OSError):
            return None
    return out


def module_row(m) -> tuple:
    """A ModuleScore as the columns of the ``modules`` table (db.MODULE_COLUMNS)."""
    return (m.name, m.kind, m.block, m.d, m.k, m.r, m.scale, m.t, m.sharpness, m.deviation, m.magnitude,
            m.magnitude_norm, m.ddi, m.ddi_norm, m.delta_norm, m.base_norm, m.cosine, m.ediem)


def _profile(base: str, pin: str | None):
    """The base to scan: a profile opened once per worker (verified against ``pin``), or the path."""
    from ..profile import Profile, is_profile

    if not is_profile(base):
        return base
    if (base, pin) not in _PROFILES:
        _PROFILES[(base, pin)] = Profile(base, sha256=pin)
    return _PROFILES[(base, pin)]


def score_adapter(path: str, base: str | None, pin: str | None, options: dict, error: str | None = None) -> dict:
    """The adapter's row: its scores against ``base`` (a profile pinned to ``pin``, or a
    checkpoint) with the scan ``options``, or, when ``error`` is given or the scan fails,
    an error row with the message."""
    files = _digests(path)
    row = {"path": path, "files": files or [], "digests": [f[3] for f in files] if files else None,
           "sha256": files[0][3] if files else "", "size": files[0][1] if files else 0, "status": "error",
           "error": error, "n_modules": None, "max_ddi": None, "modules": [], "ddiscan_version": __version__}
    if error is not None:
        return row
    try:
        from ..scan import scan

        report = scan(_profile(base, pin), path, **options)
    except DdiscanError as exc:
        return {**row, "error": printable(str(exc))}
    except Exception as exc:  # a bug: the adapter's row says so, the audit goes on
        return {**row, "error": printable(f"internal error: {type(exc).__name__}: {exc} (please report)")}
    ddis = [m.ddi for m in report.modules if m.finite and m.ddi is not None]
    return {**row, "status": "ok", "n_modules": len(report.modules), "max_ddi": max(ddis) if ddis else None,
            "modules": [module_row(m) for m in report.modules]}
