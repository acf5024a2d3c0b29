"""The audit on a Dask cluster: an in-process local cluster by default (``workers``
processes), or the scheduler at ``scheduler``, or a ``client`` the caller made. The client
finds the adapters and their bases, prepares each base once, skips what the database
already holds, submits one task per adapter, and commits the rows as tasks finish, each
batch one transaction. A worker lost mid-task is survived by Dask (the task runs again
elsewhere); a client killed mid-audit loses nothing committed, and a rerun does the rest."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from ..errors import DdiscanError, InputError, UsageError, printable
from ..locate import find_base
from ..options import OptionError, ScanOptions
from ..sketch import Sketch
from .bases import prepare
from .db import Database
from .discover import discover
from .tasks import adapter_files, file_state, identity, score_adapter

__all__ = ["audit", "AuditResult", "DEFAULT_DB", "LOCAL_ONLY"]

DEFAULT_DB = "audit.sqlite"
LOCAL_ONLY = ("progress",)  # ScanOptions fields that are not scan parameters
CONNECT_TIMEOUT = 30  # seconds to reach a --scheduler


@dataclass(frozen=True)
class AuditResult:
    """What one audit did: adapters ``scanned`` (tasks run) of which ``errors`` gave an
    error row, ``skipped`` as already in the database, and notes (paths passed over)."""

    db: Path
    scanned: int
    skipped: int
    errors: int
    notes: list[str] = field(default_factory=list)


def audit(paths, *, base=None, db=DEFAULT_DB, client=None, workers=None, scheduler=None, retry_errors=False,
          max_t: int = 64, profiles=(), **scan_options) -> AuditResult:
    """Score every adapter among ``paths`` into the SQLite database ``db``.

    ``paths`` are adapters, directory trees, Hugging Face caches or ``@LIST`` files
    (:mod:`ddiscan.auditing.discover`); ``base`` the base of them all (default: each
    adapter's, found offline as :func:`ddiscan.find_base` finds it, with ``profiles``);
    ``client`` a ``distributed.Client`` to run on, else ``scheduler`` (an address), else a
    local cluster of ``workers`` processes; ``retry_errors`` scans the error rows again;
    ``max_t`` the widest subspace of the profiles built; ``scan_options`` as for
    :func:`ddiscan.scan`, recorded in every row's ``parameters``.
    """
    if max_t < 1:
        raise OptionError("{max_t} must be at least 1", "max_t")
    options = ScanOptions(**scan_options)
    scan = _scan_options(options)
    parameters = json.dumps({**scan, "max_t": max_t}, sort_keys=True)
    targets, notes = discover(paths)
    with Database(db) as database, _cluster(client, workers, scheduler) as dask:
        jobs = _jobs(dask, database, base, targets, profiles, max_t, options)
        todo = [job for job in jobs if not _done(database, job, parameters, retry_errors)]
        errors = _run(dask, database, todo, scan, parameters, options.progress)
    return AuditResult(Path(db), len(todo), len(jobs) - len(todo), errors, notes)


def _scan_options(options: ScanOptions) -> dict:
    """The options every task scans with, as plain values (paths as strings)."""
    out = {name: getattr(options, name) for name in ScanOptions.names() if name not in LOCAL_ONLY}
    for name in ("aligned", "unaligned"):
        out[name] = None if out[name] is None else str(out[name])
    out["components"] = None if out["components"] is None else list(out["components"])
    return out


def _jobs(dask, database, base, targets, profiles, max_t, options) -> list[tuple]:
    """(adapter, what to score it against, profile pin, base fingerprint, error) for each
    adapter; an adapter whose base is not found, or whose base cannot be read, has the
    error and no base."""
    groups, jobs = {}, []
    for adapter in targets:
        try:
            groups.setdefault(str(base if base is not None else find_base(adapter, profiles=profiles or None).path),
                              []).append(adapter)
        except DdiscanError as exc:
            jobs.append((adapter, None, None, None, printable(str(exc))))
    sketch = Sketch(oversample=options.oversample, power_iters=options.power_iters, seed=options.seed,
                    exact=options.exact, kernel=options.sketch, krylov_iters=options.krylov_iters)
    for base_path, adapters in groups.items():
        try:
            ready = prepare(dask, database, base_path, max_t, sketch, options.method)
        except DdiscanError as exc:
            jobs += [(a, None, None, None, printable(f"base {base_path}: {exc}")) for a in adapters]
            continue
        jobs += [(a, ready.path, ready.pin, ready.fingerprint, None) for a in adapters]
    return jobs


def _done(database: Database, job: tuple, parameters: str, retry_errors: bool) -> bool:
    """Whether the database holds this adapter's row already (its files unchanged)."""
    path, _, _, fingerprint, _ = job
    digests = []
    for file in adapter_files(path):
        state = file_state(file)
        digest = database.digest(*state) if state else None
        if digest is None:
            return False
        digests.append(digest)
    return database.is_done(identity(digests, path, fingerprint, parameters), retry_errors)


def _run(dask, database: Database, todo: list[tuple], scan: dict, parameters: str, progress: bool) -> int:
    """Run ``todo`` on the cluster, committing rows as tasks finish; the error rows' count."""
    from distributed import as_completed

    futures = {dask.submit(score_adapter, path, against, pin, scan, error, pure=False): (path, fingerprint)
               for path, against, pin, fingerprint, error in todo}
    errors = 0
    with tqdm(total=len(futures), desc="auditing", unit="adapter", file=sys.stderr, disable=not progress) as bar:
        for batch in as_completed(futures).batches():
            rows = [_row(future, *futures.pop(future), scan, parameters) for future in batch]
            database.write(rows)
            errors += sum(row["status"] == "error" for row in rows)
            bar.update(len(rows))
    return errors


def _row(future, path: str, fingerprint: str | None, scan: dict, parameters: str) -> dict:
    """The finished task's row with its identity, base, parameters and time."""
    from distributed import KilledWorker

    try:
        row = future.result()
    except KilledWorker as exc:  # every worker that ran it died: the adapter's own doing (memory, a crash)
        row = score_adapter(path, None, None, scan, printable(f"not scanned: every worker that ran it died ({exc})"))
    except Exception as exc:  # noqa: BLE001 - the cluster, not the adapter: nothing is recorded, a rerun resumes
        raise InputError(printable(f"the Dask cluster failed mid-audit ({type(exc).__name__}: {exc}); the rows "
                                   "committed are kept: run the audit again to resume")) from None
    future.release()
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {**row, "key": identity(row["digests"], path, fingerprint, parameters), "base": fingerprint,
            "parameters": parameters, "scanned_at": stamp}


def _distributed():
    try:
        import distributed
    except ImportError:
        raise UsageError("the audit runs on Dask: pip install 'ddiscan[audit]'") from None
    return distributed


@contextmanager
def _cluster(client, workers, scheduler):
    """The client to run on: the caller's, one connected to ``scheduler``, or one of a
    local cluster of ``workers`` processes (one thread each) started for this audit."""
    if client is not None:
        yield client
        return
    distributed = _distributed()
    with _quiet_dask():
        yield from _connected(distributed, workers, scheduler)


@contextmanager
def _quiet_dask():
    """Dask's own log records (a lost scheduler logs tracebacks) kept off stderr: a failure
    reaches the user as the audit's one-line error."""
    names = ["distributed", *(n for n in logging.root.manager.loggerDict if n.startswith("distributed."))]
    loggers = [logging.getLogger(name) for name in names]  # dask sets some children's levels itself
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _connected(distributed, workers, scheduler):
    if scheduler is not None:
        try:
            connected = distributed.Client(scheduler, timeout=CONNECT_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - OSError, TimeoutError, a malformed address
            shown = printable(f"{scheduler}: cannot connect ({exc})").replace("{", "{{").replace("}", "}}")
            raise InputError("{scheduler} " + shown, "scheduler") from None
        with connected:
            yield connected
        return
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=logging.ERROR) as cluster, distributed.Client(cluster) as local:
        yield local
