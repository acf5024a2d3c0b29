"""Each base of an audit, read once for the whole collection: its fingerprint (the sha256
over its files' sha256, or a profile's own digest) and the base profile its adapters are
scored against, reused when one of that fingerprint and sketch exists, else built on the
cluster, one task per group of base weights, and written by the client."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..io.index import TensorIndex
from ..sources.gguf import open_weights
from ..io.reader import sha256
from ..profile import SUFFIX, Profile, is_profile, profile_keys, write_profile
from ..sketch import Sketch
from .tasks import file_state, sketch_keys

__all__ = ["Prepared", "prepare", "profile_dir", "GROUP"]

GROUP = 8  # base weights per sketching task


@dataclass(frozen=True)
class Prepared:
    """What the adapters of one base are scored against: ``path`` (a profile, or for the
    methods other than DDI the checkpoint itself), the profile's digest ``pin`` (None for a
    checkpoint) and the base's ``fingerprint``."""

    path: str
    pin: str | None
    fingerprint: str


def profile_dir(db_path: Path) -> Path:
    """Where an audit keeps the profiles it builds: ``DB.profiles/`` beside the database."""
    return db_path.with_name(db_path.name + ".profiles")


def prepare(client, database, base: str, max_t: int, sketch: Sketch, method: str) -> Prepared:
    """The base's fingerprint and, for DDI, its profile (reused or built), recorded in ``bases``."""
    if is_profile(base):
        profile = Profile(base)
        database.put_base(profile.sha256, str(base), str(base))
        return Prepared(str(base), profile.sha256, profile.sha256)
    index = open_weights(base, sketch)  # a checkpoint (quantized or not) or a GGUF file
    fingerprint = _fingerprint(database, index)
    if method != "ddi":
        database.put_base(fingerprint, str(base), None)
        return Prepared(str(base), None, fingerprint)
    path = _profile_path(database.path, fingerprint, max_t, sketch)
    profile = _reusable(path) or _build(client, index, path, max_t, sketch)
    database.put_base(fingerprint, str(base), str(path))
    return Prepared(str(path), profile.sha256, fingerprint)


def _fingerprint(database, index: TensorIndex) -> str:
    """sha256 over the base files' names and sha256, each read only when the database
    has no digest for its path, size and mtime."""
    named, fresh = [], []
    for file in index.files:
        state = file_state(file)
        digest = database.digest(*state) if state else None
        if digest is None:
            digest = sha256(file)
            fresh += [(*state, digest)] if state else []
        named.append([file.name, digest])
    database.put_files(fresh)
    return hashlib.sha256(json.dumps(named).encode()).hexdigest()


def _profile_path(db_path: Path, fingerprint: str, max_t: int, sketch: Sketch) -> Path:
    how = json.dumps([max_t, sketch.oversample, sketch.power_iters, sketch.seed, sketch.exact, sketch.kernel,
                      sketch.krylov_iters])
    return profile_dir(db_path) / f"{fingerprint[:24]}-{hashlib.sha256(how.encode()).hexdigest()[:12]}{SUFFIX}"


def _reusable(path: Path) -> Profile | None:
    if not path.is_file():
        return None
    try:
        return Profile(path)
    except Exception:  # noqa: BLE001 - a damaged cached profile is rebuilt
        return None


def _build(client, index: TensorIndex, path: Path, max_t: int, sketch: Sketch) -> Profile:
    """The profile of ``index``, sketched by the cluster's workers (each opens the base
    itself), written atomically by this process."""
    keys = profile_keys(index)
    fields = dataclasses.asdict(sketch)  # every field of the sketch, so the workers sketch alike
    futures = [client.submit(sketch_keys, str(index.path), keys[i:i + GROUP], max_t, fields, pure=False)
               for i in range(0, len(keys), GROUP)]
    computed: dict = {}
    for future in futures:
        computed.update(future.result())
        future.release()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_profile(index, path, keys, max_t, sketch, computed.__getitem__, force=True)
    return Profile(path)
