"""The Hugging Face hub cache, read as ``huggingface_hub`` reads it, without any network.

:func:`hub_cache_dir` finds the cache as ``huggingface_hub.constants`` does;
:func:`snapshot_choice` picks the snapshot of a repo that the adapter's revision resolves to
(``snapshot_download(..., local_files_only=True)``, imported only here and only when the
cache is searched), or guesses among those present when no revision is named
(:mod:`ddiscan.locate` describes the rules). :func:`checkpoint_problem` says why a
candidate is not a usable base.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import InputError
from .io.quantindex import open_checkpoint

__all__ = ["expand", "home", "hub_cache_dir", "snapshot_choice", "checkpoint_problem", "one_line", "shown"]

_PICKLE_GLOBS = ("*.bin", "*.pt", "*.pth")


def expand(value: str, env) -> str:
    """``~`` and ``$VAR``/``${VAR}`` expanded from ``env`` (as huggingface_hub expands them)."""

    def var(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return env[name] if name in env else match.group(0)

    value = re.sub(r"\$(?:(\w+)|\{([^}]*)\})", var, value)
    if value == "~" or value.startswith("~/") or value.startswith("~" + os.sep):
        home = env.get("HOME") or os.path.expanduser("~")
        value = home + value[1:]
    elif value.startswith("~"):
        value = os.path.expanduser(value)
    return value


def home(env) -> str:
    return env.get("HOME") or os.path.expanduser("~")


def hub_cache_dir(env=None) -> tuple[Path, str]:
    """The Hugging Face hub cache directory and the setting it came from.

    Same precedence as ``huggingface_hub.constants``: ``HF_HUB_CACHE``, then
    ``HUGGINGFACE_HUB_CACHE``, then ``$HF_HOME/hub``, then
    ``$XDG_CACHE_HOME/huggingface/hub``, then ``~/.cache/huggingface/hub``.
    """
    env = os.environ if env is None else env
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(expand(env[var], env)), var
    if env.get("HF_HOME"):
        return Path(expand(env["HF_HOME"], env)) / "hub", "HF_HOME"
    if env.get("XDG_CACHE_HOME"):
        return Path(expand(env["XDG_CACHE_HOME"], env)) / "huggingface" / "hub", "XDG_CACHE_HOME"
    return Path(home(env)) / ".cache" / "huggingface" / "hub", "default"


def one_line(text: str) -> str:
    return " ".join(shown(text).split())


def shown(text) -> str:
    """``text`` with control characters escaped (as repr writes them), for a message."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))


def checkpoint_problem(path: Path) -> str | None:
    """None if ``path`` opens as a base checkpoint; otherwise why not, in a few words."""
    if path.is_dir():
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))
        if not has_weights:
            pickles = sorted(p.name for g in _PICKLE_GLOBS for p in path.glob(g))
            if pickles:
                return f"no .safetensors weights, only {', '.join(pickles[:3])}"
            present = sorted(p.name for p in path.iterdir())
            listed = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
            return f"no .safetensors weights ({'only ' + listed if present else 'empty'})"
    try:
        open_checkpoint(path)
    except InputError as exc:
        return one_line(exc)
    except OSError as exc:
        return one_line(exc.strerror or exc)
    return None


def _hub_snapshot(cache: Path, repo_dir: Path, repo_id: str, revision: str) -> tuple[Path | None, str]:
    """The snapshot huggingface_hub resolves ``revision`` to in ``cache``, without network,
    or None and why not."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except (OSError, ValueError) as exc:  # LocalEntryNotFoundError is a FileNotFoundError
        if type(exc).__name__ == "IncompleteSnapshotError":
            return None, one_line(exc)
        return None, ""
    snapshots_dir = repo_dir / "snapshots"
    if os.path.abspath(folder.parent) != os.path.abspath(snapshots_dir):
        return None, f"refs/{revision} points outside {snapshots_dir}"
    return snapshots_dir / folder.name, ""


def snapshot_choice(repo_dir: Path, cache: Path, repo_id: str, revision: str | None,
                    warnings: list[str]) -> tuple[Path | None, str]:
    """The snapshot to use in ``repo_dir`` (or None) and a note on how it was chosen / why none."""
    snapshots_dir = repo_dir / "snapshots"
    snapshots = sorted(p for p in snapshots_dir.iterdir() if p.is_dir()) if snapshots_dir.is_dir() else []
    if not snapshots:
        return None, "no snapshots"
    label = f"revision {revision!r} of the adapter's config" if revision else "refs/main"
    snapshot, why = _hub_snapshot(cache, repo_dir, repo_id, revision or "main")
    if snapshot is not None:
        how = f"snapshot {snapshot.name[:12]} ({label})"
        problem = checkpoint_problem(snapshot)
        return (None, f"{how}: {problem}") if problem else (snapshot, how)
    if revision is not None or why:  # a named revision is that one or none
        present = ", ".join(p.name[:12] for p in snapshots)
        return None, f"{label}: {why or f'not in this cache (snapshots present: {present})'}"
    _warn_dangling_main(repo_dir, warnings)
    return _guessed_snapshot(repo_dir, snapshots, warnings)


def _warn_dangling_main(repo_dir: Path, warnings: list[str]) -> None:
    """A ``refs/main`` that names a snapshot not in the cache is worth a warning."""
    ref = repo_dir / "refs" / "main"
    if not ref.is_file():
        return
    try:
        commit = ref.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as exc:
        commit = "(unreadable)"
        warnings.append(f"{ref}: unreadable ({one_line(exc.strerror or exc)})")
    warnings.append(f"{ref} names {commit[:12]!r}, which is not in {repo_dir / 'snapshots'}; "
                    "choosing among the snapshots present")


def _guessed_snapshot(repo_dir: Path, snapshots: list[Path], warnings: list[str]) -> tuple[Path | None, str]:
    """With no revision to go by: the only snapshot with weights, or the most recently
    modified of several (with a warning)."""
    usable, problems = [], []
    for snapshot in snapshots:
        problem = checkpoint_problem(snapshot)
        if problem:
            problems.append(f"snapshot {snapshot.name[:12]}: {problem}")
        else:
            usable.append(snapshot)
    if not usable:
        return None, "; ".join(problems)
    if len(usable) == 1:
        if problems:
            warnings.append(f"{repo_dir.name}: skipped " + "; ".join(problems))
        return usable[0], f"snapshot {usable[0].name[:12]}"
    newest = max(usable, key=lambda p: (p.stat().st_mtime, p.name))
    warnings.append(
        f"{repo_dir}: {len(usable)} snapshots with weights and no refs/main; using the most recently "
        f"modified, {newest.name[:12]} (pass BASE to choose another)"
    )
    return newest, f"snapshot {newest.name[:12]} (most recently modified of {len(usable)}, no refs/main)"
