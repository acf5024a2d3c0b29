"""The audit against a real Dask cluster: a ``dask scheduler`` and two ``dask worker``
processes started here on 127.0.0.1 (free ports: the scheduler's address is read from its
--scheduler-file), every wait bounded, every process killed at the end even on failure.

* a worker SIGKILLed mid-audit: the audit completes (Dask runs its tasks elsewhere) and
  its database equals an uninterrupted run's;
* the scheduler SIGKILLed mid-audit: the client stops with a one-line error and a sound
  database, and a rerun on a new cluster ends with the database an uninterrupted run gives;
* the client SIGKILLed right after its n-th commit (a driver patches the database's
  transaction to kill the process, as tests/test_kill.py does), then run again: the
  database equals an uninterrupted run's (every row but scanned_at) and is never corrupt.

The workers preload a module that makes each adapter's task take a little longer, so that
"mid-audit" is a wide window on a loaded machine.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audit_helpers import build_collection, content

pytest.importorskip("distributed")  # the test extra installs it: never skipped in CI

WAIT = 90  # seconds: the bound on every wait for a process or a database row
ENV = {k: v for k, v in os.environ.items() if k != "DDISCAN_DEBUG"}

# (a worker may import its preload twice: the real task is kept where a second import finds it)
SLOW = """
import time
import ddiscan.auditing.tasks as tasks
_score = tasks.__dict__.setdefault("unslowed_score_adapter", tasks.score_adapter)
def score_adapter(*args, **kwargs):
    time.sleep(0.3)
    return _score(*args, **kwargs)
tasks.score_adapter = score_adapter
"""

# The CLI, SIGKILLed right after its n-th committed transaction (n = 0: never; the count is printed)
DRIVER = r"""
import os, signal, sys
from ddiscan.auditing import db
n, count = int(sys.argv[1]), [0]
commit = db._Transaction.__exit__
def counted(self, kind, *exc):
    commit(self, kind, *exc)
    count[0] += 1
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
db._Transaction.__exit__ = counted
from ddiscan.cli import cli
try:
    cli.main(sys.argv[2:], prog_name="ddiscan")
finally:
    print("commits", count[0], file=sys.stderr)
"""


class Cluster:
    """A scheduler and two workers in their own processes, stopped by :meth:`stop`."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        file, slow = root / "scheduler.json", root / "slow_tasks.py"
        slow.write_text(SLOW)
        self._start("distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                    "--scheduler-file", str(file))
        deadline = time.monotonic() + WAIT
        while not (file.is_file() and file.stat().st_size):
            assert time.monotonic() < deadline and self.procs[0].poll() is None, "the scheduler did not start"
            time.sleep(0.1)
        self.address = json.loads(file.read_text())["address"]
        self.workers = [self._start("distributed.cli.dask_worker", self.address, "--nthreads", "1", "--no-nanny",
                                    "--no-dashboard", "--host", "127.0.0.1", "--preload", str(slow),
                                    "--name", f"w{i}") for i in range(2)]
        from distributed import Client

        with Client(self.address, timeout=WAIT) as client:
            client.wait_for_workers(2, timeout=WAIT)

    def _start(self, module: str, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], env=ENV, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=WAIT)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return build_collection(tmp_path_factory.mktemp("collection"))


@pytest.fixture
def cluster(tmp_path):
    started = None
    try:
        started = Cluster(tmp_path / "cluster")
        yield started
    finally:
        if started is not None:
            started.stop()


def audit_args(collection, db: Path, cluster: Cluster) -> list[str]:
    return ["audit", str(collection["adapters"]), "--db", str(db), "--scheduler", cluster.address, "-q"]


def run(args, n: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, str(n), *args], capture_output=True, text=True, env=ENV,
                          timeout=WAIT, stdin=subprocess.DEVNULL)


def test_a_worker_killed_mid_audit_is_survived(collection, cluster, tmp_path):
    reference = tmp_path / "reference.sqlite"
    assert run(audit_args(collection, reference, cluster)).returncode == 0
    db = tmp_path / "audit.sqlite"
    proc, stderr, at_kill = _kill_mid_audit(collection, db, cluster, cluster.workers[0])
    assert proc.returncode == 0, stderr
    assert cluster.workers[0].wait(timeout=WAIT) == -signal.SIGKILL
    assert at_kill < _rows(reference)  # the kill came before the audit's end
    assert content(db) == content(reference)


def test_a_scheduler_killed_mid_audit_then_rerun_on_a_new_cluster_gives_the_same_database(collection, cluster,
                                                                                          tmp_path):
    reference = tmp_path / "reference.sqlite"
    assert run(audit_args(collection, reference, cluster)).returncode == 0
    db = tmp_path / "audit.sqlite"
    proc, stderr, _ = _kill_mid_audit(collection, db, cluster, cluster.procs[0])  # procs[0]: the scheduler
    assert cluster.procs[0].wait(timeout=WAIT) == -signal.SIGKILL
    assert proc.returncode not in (0, -signal.SIGKILL), stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    con = sqlite3.connect(db, timeout=WAIT)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()
    assert _rows(db) < _rows(reference)  # the kill came before the audit's end
    fresh = Cluster(tmp_path / "cluster-2")
    try:
        again = run(audit_args(collection, db, fresh))
    finally:
        fresh.stop()
    assert again.returncode == 0, again.stderr
    assert content(db) == content(reference)


def test_a_client_killed_after_each_commit_then_rerun_gives_the_same_database(collection, cluster, tmp_path):
    reference = tmp_path / "reference.sqlite"
    first = run(audit_args(collection, reference, cluster))
    assert first.returncode == 0, first.stderr
    commits = int(first.stderr.split()[-1])
    assert commits >= 4
    for n in sorted({1, 2, 3, commits // 2 + 1, commits - 1}):
        db = tmp_path / f"killed-{n}.sqlite"
        killed = run(audit_args(collection, db, cluster), n)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        again = run(audit_args(collection, db, cluster))
        assert again.returncode == 0, again.stderr
        assert content(db) == content(reference), f"killed after commit {n}"


def _kill_mid_audit(collection, db: Path, cluster: Cluster, victim: subprocess.Popen):
    """Run the audit into ``db`` and SIGKILL ``victim`` once its first row is committed; the
    audit's process (finished), its stderr, and the rows there were at the kill."""
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, "0", *audit_args(collection, db, cluster)], env=ENV,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + WAIT
        while not _rows(db):
            assert time.monotonic() < deadline and proc.poll() is None, "no row was committed"
            time.sleep(0.05)
        at_kill = _rows(db)
        victim.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=2 * WAIT)
    finally:
        proc.kill()
    return proc, stderr, at_kill


def _rows(db: Path) -> int:
    if not db.is_file():
        return 0
    con = sqlite3.connect(db, timeout=WAIT)
    try:
        return con.execute("SELECT count(*) FROM adapters").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not committed yet
        return 0
    finally:
        con.close()
