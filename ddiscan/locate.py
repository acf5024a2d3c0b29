"""Find an adapter's base checkpoint on this machine, without any network access.

When the base is not given, the adapter names it: ``base_model_name_or_path`` in its
``adapter_config.json`` (or, for a ``.safetensors`` file without one beside it, in the
``lora_adapter_metadata`` diffusers stores in the file's ``__metadata__``), and its
``revision`` (PEFT writes the one the base was loaded at; null for the default branch).
That name is looked for, in this order:

1. **a local path**: as given if absolute (never ``~`` or ``$VAR`` expanded), else relative to the current directory, then
   relative to the adapter's directory (a PEFT directory itself; a file's parent);
2. **the Hugging Face hub cache**: ``HF_HUB_CACHE``, else the legacy
   ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub`` (the order
   ``huggingface_hub`` itself uses), in ``models--ORG--NAME/snapshots/COMMIT/``. The
   snapshot is the one ``huggingface_hub.snapshot_download(..., local_files_only=True)``
   resolves the adapter's revision to (a branch or tag through ``refs/REVISION``, a commit
   hash directly); a named revision that is not in the cache is not replaced by another.
   With no revision named: ``refs/main``'s; without that ref (or if it names a snapshot
   not present), the only snapshot, or the most recently modified of several (with a
   warning). A snapshot without safetensors weights (only config files, or only
   ``pytorch_model.bin``) is skipped and the reason noted;
3. **profile directories**: each of ``profiles`` (``--profiles DIR``), then each entry of
   ``DDISCAN_PROFILES`` (``os.pathsep``-separated), for ``ORG--NAME.ddiprofile``, then for
   ``NAME.ddiprofile``.

Every candidate is accepted only if it opens as a checkpoint (``io.index.TensorIndex``), so
a directory that exists but holds no weights is passed over, not returned. When nothing is
found, :class:`~ddiscan.errors.InputError` names, on one line, the name looked for and
every place looked in. Nothing here opens a socket; ``huggingface_hub`` (the client that
writes the cache, so its reading of the cache is the right one) is imported only when the
cache is searched, and only ever called with ``local_files_only=True``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .io.index import TensorIndex

__all__ = ["Located", "find_base", "base_model_name", "hub_cache_dir", "PROFILE_SUFFIX", "PROFILES_ENV"]

PROFILE_SUFFIX = ".ddiprofile"
PROFILES_ENV = "DDISCAN_PROFILES"

# huggingface_hub's validate_repo_id: "name" or "namespace/name", word characters, '-'
# and '.' (each part starting and ending with a word character), no '--' or '..', at most
# 96 characters
_REPO_ID = re.compile(r"^(?:\w(?:[\w.-]*\w)?/)?\w(?:[\w.-]*\w)?$")
_PICKLE_GLOBS = ("*.bin", "*.pt", "*.pth")
# a branch or tag name (path-like parts of word characters, '.' and '-'), or a commit hash
_REVISION = re.compile(r"^[\w.-]+(?:/[\w.-]+)*$")


@dataclass(frozen=True)
class Located:
    """Where the base was found.

    ``path`` is what to pass as BASE (a checkpoint directory or file, or a profile);
    ``source`` is ``"path"``, ``"hf-cache"`` or ``"profile"``; ``detail`` says where, in
    words, for the report; ``warnings`` are things worth printing as ``warning:`` lines
    (a guessed snapshot, candidates passed over). A ``Located`` is path-like, so it can be
    given to :func:`ddiscan.scan` as is.
    """

    path: Path
    source: str
    name: str
    detail: str
    warnings: tuple[str, ...] = field(default=())

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return self.detail


# ---------------------------------------------------------------------------------------
# The adapter's base name


def base_model_name(adapter_path) -> str:
    """``base_model_name_or_path`` of the adapter at ``adapter_path``; InputError if none."""
    return _base_reference(adapter_path)[0]


def _base_reference(adapter_path) -> tuple[str, str | None]:
    """``base_model_name_or_path`` and ``revision`` (None if not named) of the adapter."""
    from .lora import load_adapter

    adapter = load_adapter(adapter_path)
    if adapter.config is None:
        raise InputError(
            f"{adapter_path}: no adapter_config.json (and no __metadata__['lora_adapter_metadata']) "
            "names the base model; pass BASE"
        )
    name = adapter.config.get("base_model_name_or_path")
    if not isinstance(name, str) or not name.strip():
        raise InputError(
            f"{adapter_path}: {adapter.config_source} has no base_model_name_or_path; pass BASE"
        )
    revision = adapter.config.get("revision")
    if revision is None or revision == "":
        return name.strip(), None
    if not isinstance(revision, str) or not _REVISION.match(revision) or ".." in revision.split("/"):
        raise InputError(f"{adapter.config_source}: revision {revision!r} is not a branch, tag or commit name")
    return name.strip(), revision


# ---------------------------------------------------------------------------------------
# Environment


def _expand(value: str, env) -> str:
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


def _home(env) -> str:
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
            return Path(_expand(env[var], env)), var
    if env.get("HF_HOME"):
        return Path(_expand(env["HF_HOME"], env)) / "hub", "HF_HOME"
    if env.get("XDG_CACHE_HOME"):
        return Path(_expand(env["XDG_CACHE_HOME"], env)) / "huggingface" / "hub", "XDG_CACHE_HOME"
    return Path(_home(env)) / ".cache" / "huggingface" / "hub", "default"


def _profile_dirs(profiles, env) -> list[tuple[Path, str]]:
    dirs: list[tuple[Path, str]] = []
    for d in profiles or ():
        dirs.append((Path(_expand(os.fspath(d), env)), "--profiles"))
    for d in (env.get(PROFILES_ENV) or "").split(os.pathsep):
        if d.strip():
            dirs.append((Path(_expand(d.strip(), env)), PROFILES_ENV))
    return dirs


# ---------------------------------------------------------------------------------------
# Candidates


def _one_line(text: str) -> str:
    return " ".join(_shown(text).split())


def _shown(text) -> str:
    """``text`` with control characters escaped (as repr writes them), for a message."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))


def _untrusted_problem(path: Path) -> str | None:
    """Like :func:`_checkpoint_problem` for a path named by the adapter's config, which a
    stranger may have written: the reason is in general words, never a listing of the
    directory or text derived from the file's bytes (``/etc``, ``/etc/passwd``)."""
    if not (path.is_dir() or path.is_file()):
        return "not a regular file or directory"
    if path.is_dir() and not (any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))):
        return "no .safetensors weights"
    try:
        TensorIndex(path)
    except InputError as exc:
        return (type(exc).__doc__ or "unreadable").strip().splitlines()[0].rstrip(".").lower()
    except OSError:
        return "unreadable"
    return None


def _checkpoint_problem(path: Path) -> str | None:
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
        TensorIndex(path)
    except InputError as exc:
        return _one_line(exc)
    except OSError as exc:
        return _one_line(exc.strerror or exc)
    return None


def _local_candidates(name: str, adapter_path: Path, cwd: Path) -> list[Path]:
    """Where the config's name is tried as a path: as given (never ``~`` or ``$VAR``
    expanded: the name is the config's, not the user's), from ``cwd``, then the adapter's directory."""
    given = Path(name)
    if given.is_absolute():
        return [given]
    adapter_dir = adapter_path if adapter_path.is_dir() else adapter_path.parent
    out: list[Path] = []
    for root in (cwd, adapter_dir):
        candidate = Path(os.path.abspath(root / given))
        if candidate not in out:
            out.append(candidate)
    return out


def _hub_snapshot(cache: Path, repo_dir: Path, repo_id: str, revision: str) -> tuple[Path | None, str]:
    """The snapshot huggingface_hub resolves ``revision`` to in ``cache``, without network,
    or None and why not."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except (OSError, ValueError) as exc:  # LocalEntryNotFoundError is a FileNotFoundError
        if type(exc).__name__ == "IncompleteSnapshotError":
            return None, _one_line(exc)
        return None, ""
    snapshots_dir = repo_dir / "snapshots"
    if os.path.abspath(folder.parent) != os.path.abspath(snapshots_dir):
        return None, f"refs/{revision} points outside {snapshots_dir}"
    return snapshots_dir / folder.name, ""


def _snapshot_choice(repo_dir: Path, cache: Path, repo_id: str, revision: str | None,
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
        problem = _checkpoint_problem(snapshot)
        return (None, f"{how}: {problem}") if problem else (snapshot, how)
    if revision is not None or why:  # a named revision is that one or none
        present = ", ".join(p.name[:12] for p in snapshots)
        return None, f"{label}: {why or f'not in this cache (snapshots present: {present})'}"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        try:
            commit = ref.read_text(encoding="utf-8", errors="replace").strip()
        except OSError as exc:
            commit = "(unreadable)"
            warnings.append(f"{ref}: unreadable ({_one_line(exc.strerror or exc)})")
        warnings.append(f"{ref} names {commit[:12]!r}, which is not in {snapshots_dir}; choosing among the snapshots present")
    usable, problems = [], []
    for snapshot in snapshots:
        problem = _checkpoint_problem(snapshot)
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


def _profile_names(name: str) -> list[str]:
    if _REPO_ID.match(name):
        parts = name.split("/")
        names = ["--".join(parts) + PROFILE_SUFFIX]
        if len(parts) == 2:
            names.append(parts[1] + PROFILE_SUFFIX)
        return names
    stem = Path(name.rstrip("/\\")).name
    return [stem + PROFILE_SUFFIX] if stem else []


def _is_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and "--" not in name and ".." not in name and len(name) <= 96


# ---------------------------------------------------------------------------------------
# The lookup


def find_base(adapter_path, *, profiles=None, env=None, cwd=None) -> Located:
    """Find the base model the adapter at ``adapter_path`` names, on this machine only.

    Parameters
    ----------
    adapter_path : path-like
        A ``.safetensors`` adapter file or a PEFT adapter directory.
    profiles : list of path-like, optional
        Directories of ``.ddiprofile`` files (``--profiles``), searched before those in
        ``DDISCAN_PROFILES``.
    env : mapping, optional
        The environment to read (``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME``,
        ``XDG_CACHE_HOME``, ``HOME``, ``DDISCAN_PROFILES``); default ``os.environ``.
    cwd : path-like, optional
        The directory relative names are resolved against first; default the current one.

    Returns
    -------
    Located
        ``path`` to pass as BASE, ``source`` (``path``/``hf-cache``/``profile``),
        ``detail`` and ``warnings``.

    Raises
    ------
    InputError
        The adapter names no base, or nothing was found; the message, one line, lists
        every place looked in.
    """
    env = os.environ if env is None else env
    adapter_path = Path(adapter_path)
    cwd = Path(os.path.abspath(cwd if cwd is not None else os.getcwd()))
    name, revision = _base_reference(adapter_path)
    warnings: list[str] = []
    looked: list[str] = []

    # 1. a local path
    for candidate in _local_candidates(name, adapter_path, cwd):
        if not candidate.exists():
            looked.append(_shown(candidate))
            continue
        problem = _untrusted_problem(candidate)
        if problem is None:
            return Located(candidate, "path", name, f"local path {_shown(candidate)}", tuple(warnings))
        looked.append(f"{_shown(candidate)} ({problem})")
        warnings.append(f"{_shown(candidate)} exists but is not a usable base: {problem}")

    # 2. the Hugging Face hub cache
    cache, setting = hub_cache_dir(env)
    if _is_repo_id(name):
        repo_dir = cache / ("models--" + name.replace("/", "--"))
        if not repo_dir.is_dir():
            looked.append(str(repo_dir))
        else:
            snapshot, how = _snapshot_choice(repo_dir, cache, name, revision, warnings)
            if snapshot is not None:
                detail = f"Hugging Face cache ({setting}) {repo_dir}, {how}"
                return Located(snapshot, "hf-cache", name, detail, tuple(warnings))
            looked.append(f"{repo_dir} ({how})")
            warnings.append(f"{repo_dir}: skipped, {how}")
    else:
        looked.append(f"Hugging Face cache {cache} (skipped: {name!r} is not a Hub repo id)")

    # 3. profile directories
    dirs = _profile_dirs(profiles, env)
    names = _profile_names(name)
    for file_name in names:
        for directory, origin in dirs:
            candidate = directory / file_name
            if candidate.is_file():
                detail = f"profile {candidate} (from {origin})"
                return Located(candidate, "profile", name, detail, tuple(warnings))
    if not dirs:
        looked.append(f"profiles: none given (--profiles, {PROFILES_ENV})")
    else:
        listed = ", ".join(str(d) + ("" if d.is_dir() else " (no such directory)") for d, _ in dirs)
        looked.append(f"profiles {' or '.join(names)} in {listed}")

    raise InputError(_one_line(f"no base found for {name!r} (looked in: {', '.join(looked)}); pass BASE"))
