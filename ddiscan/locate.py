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

Every candidate is accepted only if it opens as a checkpoint (``io.quantindex.open_checkpoint``), so
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
from .hubcache import expand, hub_cache_dir, one_line, shown, snapshot_choice
from .io.quantindex import open_checkpoint

__all__ = ["Located", "find_base", "base_model_name", "hub_cache_dir", "PROFILE_SUFFIX", "PROFILES_ENV"]

PROFILE_SUFFIX = ".ddiprofile"
PROFILES_ENV = "DDISCAN_PROFILES"

# huggingface_hub's validate_repo_id: "name" or "namespace/name", word characters, '-'
# and '.' (each part starting and ending with a word character), no '--' or '..', at most
# 96 characters
_REPO_ID = re.compile(r"^(?:\w(?:[\w.-]*\w)?/)?\w(?:[\w.-]*\w)?$")
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
    """``base_model_name_or_path`` (MLX-LM's ``model``) and ``revision`` (None if not named)
    of the adapter."""
    from .lora import load_adapter

    adapter = load_adapter(adapter_path)
    if adapter.config is None:
        raise InputError(
            f"{adapter_path}: no adapter_config.json (and no __metadata__['lora_adapter_metadata']) "
            "names the base model; pass BASE"
        )
    field = "model" if "lora_parameters" in adapter.config else "base_model_name_or_path"  # mlx_lm lora's config
    name = adapter.config.get(field)
    if not isinstance(name, str) or not name.strip():
        raise InputError(
            f"{adapter_path}: {adapter.config_source} has no {field}; pass BASE"
        )
    revision = adapter.config.get("revision")
    if revision is None or revision == "":
        return name.strip(), None
    if not isinstance(revision, str) or not _REVISION.match(revision) or ".." in revision.split("/"):
        raise InputError(f"{adapter.config_source}: revision {revision!r} is not a branch, tag or commit name")
    return name.strip(), revision


# ---------------------------------------------------------------------------------------
# Environment


def _profile_dirs(profiles, env) -> list[tuple[Path, str]]:
    dirs: list[tuple[Path, str]] = []
    for d in profiles or ():
        dirs.append((Path(expand(os.fspath(d), env)), "--profiles"))
    for d in (env.get(PROFILES_ENV) or "").split(os.pathsep):
        if d.strip():
            dirs.append((Path(expand(d.strip(), env)), PROFILES_ENV))
    return dirs


# ---------------------------------------------------------------------------------------
# Candidates


def _untrusted_problem(path: Path) -> str | None:
    """Like :func:`checkpoint_problem` for a path named by the adapter's config, which a
    stranger may have written: the reason is in general words, never a listing of the
    directory or text derived from the file's bytes (``/etc``, ``/etc/passwd``)."""
    if not (path.is_dir() or path.is_file()):
        return "not a regular file or directory"
    if path.is_dir() and not (any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))):
        return "no .safetensors weights"
    try:
        open_checkpoint(path)
    except InputError as exc:
        return (type(exc).__doc__ or "unreadable").strip().splitlines()[0].rstrip(".").lower()
    except OSError:
        return "unreadable"
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
    search = _Search(name)
    found = (_from_path(search, adapter_path, cwd) or _from_hub_cache(search, revision, env)
             or _from_profiles(search, profiles, env))
    if found is not None:
        return found
    raise InputError(one_line(f"no base found for {name!r} (looked in: {', '.join(search.looked)}); pass BASE"))


@dataclass
class _Search:
    """The name looked for, every place looked in (for the error) and the warnings so far."""

    name: str
    looked: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def found(self, path: Path, source: str, detail: str) -> Located:
        return Located(path, source, self.name, detail, tuple(self.warnings))


def _from_path(search: _Search, adapter_path: Path, cwd: Path) -> Located | None:
    """1. the name as a local path"""
    for candidate in _local_candidates(search.name, adapter_path, cwd):
        if not candidate.exists():
            search.looked.append(shown(candidate))
            continue
        problem = _untrusted_problem(candidate)
        if problem is None:
            return search.found(candidate, "path", f"local path {shown(candidate)}")
        search.looked.append(f"{shown(candidate)} ({problem})")
        search.warnings.append(f"{shown(candidate)} exists but is not a usable base: {problem}")
    return None


def _from_hub_cache(search: _Search, revision: str | None, env) -> Located | None:
    """2. the Hugging Face hub cache"""
    cache, setting = hub_cache_dir(env)
    name = search.name
    if not _is_repo_id(name):
        search.looked.append(f"Hugging Face cache {cache} (skipped: {name!r} is not a Hub repo id)")
        return None
    repo_dir = cache / ("models--" + name.replace("/", "--"))
    if not repo_dir.is_dir():
        search.looked.append(str(repo_dir))
        return None
    snapshot, how = snapshot_choice(repo_dir, cache, name, revision, search.warnings)
    if snapshot is not None:
        return search.found(snapshot, "hf-cache", f"Hugging Face cache ({setting}) {repo_dir}, {how}")
    search.looked.append(f"{repo_dir} ({how})")
    search.warnings.append(f"{repo_dir}: skipped, {how}")
    return None


def _from_profiles(search: _Search, profiles, env) -> Located | None:
    """3. profile directories"""
    dirs = _profile_dirs(profiles, env)
    names = _profile_names(search.name)
    for file_name in names:
        for directory, origin in dirs:
            candidate = directory / file_name
            if candidate.is_file():
                return search.found(candidate, "profile", f"profile {candidate} (from {origin})")
    if not dirs:
        search.looked.append(f"profiles: none given (--profiles, {PROFILES_ENV})")
    else:
        listed = ", ".join(str(d) + ("" if d.is_dir() else " (no such directory)") for d, _ in dirs)
        search.looked.append(f"profiles {' or '.join(names)} in {listed}")
    return None
