"""``ddiscan audit`` on an in-process Dask cluster: scores equal ``report``'s to the last
bit, reruns do no work and add no row, changed adapters are rescanned, errors become rows,
and the command's answers (summary, --top in every format, --html)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.numpy
from click.testing import CliRunner

import ddiscan
from ddiscan.cli import cli

from audit_helpers import build_collection, content

distributed = pytest.importorskip("distributed")  # the test extra installs it: never skipped in CI

try:
    RUNNER = CliRunner(mix_stderr=False)
except TypeError:
    RUNNER = CliRunner()


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return build_collection(tmp_path_factory.mktemp("audit"))


@pytest.fixture(scope="module")
def client():
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as c:
        yield c


@pytest.fixture(scope="module")
def audited(collection, client, tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "audit.sqlite"
    result = ddiscan.audit([collection["adapters"]], db=db, client=client)
    return db, result


def rows(db, sql, *args):
    con = sqlite3.connect(db)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def test_every_ok_row_equals_report_against_the_same_profile(collection, audited):
    db, result = audited
    assert (result.scanned, result.skipped, result.errors) == (7, 0, 3)
    assert any("not-an-adapter.safetensors" in note and "passed over" in note for note in result.notes)
    ok = rows(db, "SELECT a.id, a.path, a.n_modules, a.max_ddi, b.profile FROM adapters a "
                  "JOIN bases b ON b.fingerprint = a.base WHERE a.status = 'ok'")
    assert sorted(Path(r[1]) for r in ok) == sorted(collection["ok"])
    for adapter_id, path, n_modules, max_ddi, profile in ok:
        report = ddiscan.scan(profile, path)
        stored = {r[0]: r[1:] for r in rows(db, "SELECT module, kind, block, d, k, r, scale, t, S, O, M, M_norm, "
                                                "ddi, ddi_norm, delta_norm, base_norm FROM modules "
                                                "WHERE adapter_id = ?", adapter_id)}
        expected = {m.name: (m.kind, m.block, m.d, m.k, m.r, m.scale, m.t, m.sharpness, m.deviation, m.magnitude,
                             m.magnitude_norm, m.ddi, m.ddi_norm, m.delta_norm, m.base_norm) for m in report.modules}
        assert stored == expected  # exact: the same floats, to the last bit
        assert (n_modules, max_ddi) == (len(report.modules), max(m.ddi for m in report.modules))


def test_the_profile_was_built_from_the_base(collection, audited):
    db, _ = audited
    [(path, profile)] = rows(db, "SELECT path, profile FROM bases")
    assert Path(path) == collection["base"]
    assert Path(profile).parent == db.with_name("audit.sqlite.profiles")
    built = ddiscan.Profile(profile)
    assert built.meta["base_files"][0]["name"] == "model.safetensors"


def test_broken_adapters_are_error_rows_with_one_line_messages(collection, audited):
    db, _ = audited
    errors = dict(rows(db, "SELECT path, error FROM adapters WHERE status = 'error'"))
    assert sorted(Path(p) for p in errors) == sorted(collection["errors"])
    for path, message in errors.items():
        assert message and "\n" not in message and "Traceback" not in message
    assert "no base found" in errors[str(collection["adapters"] / "no-base")]
    assert rows(db, "SELECT count(*) FROM adapters WHERE status = 'error' AND n_modules IS NOT NULL") == [(0,)]


def test_a_rerun_does_no_work_and_adds_no_row(collection, client, audited, monkeypatch):
    db, _ = audited
    before = rows(db, "SELECT * FROM adapters ORDER BY id"), rows(db, "SELECT * FROM modules ORDER BY adapter_id")
    [(profile,)] = rows(db, "SELECT profile FROM bases")
    stamp = os.stat(profile).st_mtime_ns
    monkeypatch.setattr("ddiscan.auditing.bases.sha256", lambda p: pytest.fail(f"hashed {p} again"))
    result = ddiscan.audit([collection["adapters"]], db=db, client=client)
    assert (result.scanned, result.skipped, result.errors) == (0, 7, 0)
    assert (rows(db, "SELECT * FROM adapters ORDER BY id"), rows(db, "SELECT * FROM modules ORDER BY adapter_id")) \
        == before
    assert os.stat(profile).st_mtime_ns == stamp  # the profile was reused, not rebuilt


def test_retry_errors_scans_only_the_errors_again_without_adding_rows(collection, client, tmp_path):
    db = tmp_path / "a.sqlite"
    ddiscan.audit([collection["adapters"]], db=db, client=client)
    first = content(db)
    result = ddiscan.audit([collection["adapters"]], db=db, client=client, retry_errors=True)
    assert (result.scanned, result.skipped, result.errors) == (3, 4, 3)
    assert content(db) == first


def test_a_changed_adapter_is_rescanned_and_its_old_row_goes(collection, client, tmp_path):
    adapters = shutil.copytree(collection["adapters"], tmp_path / "adapters")
    db = tmp_path / "a.sqlite"
    ddiscan.audit([adapters], db=db, client=client)
    [(old_sha, old_max)] = rows(db, "SELECT sha256, max_ddi FROM adapters WHERE path = ?", str(adapters / "qkvo-r4"))
    weights = adapters / "qkvo-r4" / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(weights)
    safetensors.numpy.save_file({k: v * 2 if ".lora_B." in k else v for k, v in tensors.items()}, weights)
    result = ddiscan.audit([adapters], db=db, client=client)
    assert (result.scanned, result.skipped) == (1, 6)
    [(new_sha, new_max)] = rows(db, "SELECT sha256, max_ddi FROM adapters WHERE path = ?", str(adapters / "qkvo-r4"))
    assert new_sha != old_sha and new_max != old_max
    assert rows(db, "SELECT count(*) FROM adapters") == [(7,)]


def test_lists_and_hugging_face_caches_are_searched(collection, client, tmp_path):
    cache = tmp_path / "hub" / "models--someone--lora"
    snapshot = cache / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (cache / "blobs").mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        blob = cache / "blobs" / name.replace(".", "-")
        shutil.copy(collection["adapters"] / "qv-r2" / name, blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    listing = tmp_path / "list.txt"
    listing.write_text(f"# adapters\n{os.path.relpath(collection['adapters'] / 'all-r8', tmp_path)}\n\n")
    db = tmp_path / "a.sqlite"
    result = ddiscan.audit([tmp_path / "hub", f"@{listing}"], db=db, client=client)
    assert (result.scanned, result.errors) == (2, 0)
    assert sorted(p for (p,) in rows(db, "SELECT path FROM adapters")) == sorted(
        [str(snapshot), os.path.join(tmp_path, os.path.relpath(collection["adapters"] / "all-r8", tmp_path))])


def test_a_database_of_another_kind_is_refused_on_one_line(tmp_path, collection):
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database at all" * 100)
    for db in (other, garbage):
        out = RUNNER.invoke(cli, ["audit", "--db", str(db), "--top", "3"])
        assert out.exit_code == 3 and out.stderr.count("\n") == 1 and out.stderr.startswith("Error: "), out.stderr


def test_the_command_audits_then_answers_in_every_format(collection, tmp_path, monkeypatch):
    db = tmp_path / "a.sqlite"
    out = RUNNER.invoke(cli, ["audit", str(collection["adapters"]), "--db", str(db), "--workers", "1"])
    assert out.exit_code == 0, out.stderr
    assert "7 adapter(s) scanned (3 error(s)), 0 skipped as done" in out.stderr
    assert "note: " in out.stderr and "Traceback" not in out.stderr
    top = rows(db, "SELECT path, max_ddi FROM adapters WHERE status = 'ok' ORDER BY max_ddi DESC")
    assert out.stdout.splitlines()[1].split()[1] == top[0][0]
    as_json = json.loads(RUNNER.invoke(cli, ["audit", "--db", str(db), "--top", "2", "--format", "json"]).stdout)
    assert [(r["rank"], r["path"], r["max_ddi"]) for r in as_json] == [(1, *top[0]), (2, *top[1])]
    csv_lines = RUNNER.invoke(cli, ["audit", "--db", str(db), "--top", "3", "--format", "csv"]).stdout.splitlines()
    assert csv_lines[0].startswith("rank,path,max_ddi") and len(csv_lines) == 4
    markdown = RUNNER.invoke(cli, ["audit", "--db", str(db), "--format", "markdown", "--top", "1"]).stdout
    assert markdown.startswith("| rank | path |") and top[0][0] in markdown
    again = RUNNER.invoke(cli, ["audit", str(collection["adapters"]), "--db", str(db), "--workers", "1", "-q"])
    assert again.exit_code == 0 and again.stderr == ""


def test_html_is_written_by_the_page_module(tmp_path, audited, monkeypatch):
    db, _ = audited
    calls = []
    page = type(sys)("ddiscan.auditing.html")
    page.write_html = lambda db_path, out_path: calls.append((str(db_path), str(out_path)))
    monkeypatch.setitem(sys.modules, "ddiscan.auditing.html", page)
    out = RUNNER.invoke(cli, ["audit", "--db", str(db), "--html", str(tmp_path / "a.html")])
    assert out.exit_code == 0, out.stderr
    assert calls == [(str(db), str(tmp_path / "a.html"))]


@pytest.mark.parametrize("args, message", [
    ([], "give PATH... to audit, or --top/--html to query --db"),
    (["x", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "give --workers or --scheduler, not both"),
])
def test_usage_errors_are_one_line(args, message):
    out = RUNNER.invoke(cli, ["audit", *args])
    assert out.exit_code == 2 and out.stderr == f"Error: {message}\n"


def test_without_dask_the_error_names_the_extra(collection, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    out = RUNNER.invoke(cli, ["audit", str(collection["ok"][0]), "--db", str(tmp_path / "a.sqlite")])
    assert out.exit_code == 2 and out.stderr == "Error: the audit runs on Dask: pip install 'ddiscan[audit]'\n"


def test_a_scheduler_that_is_not_there_is_one_line(collection, tmp_path, monkeypatch):
    monkeypatch.setattr("ddiscan.auditing.run.CONNECT_TIMEOUT", 2)
    out = RUNNER.invoke(cli, ["audit", str(collection["ok"][0]), "--db", str(tmp_path / "a.sqlite"),
                              "--scheduler", "tcp://127.0.0.1:9"])
    assert out.exit_code == 3 and out.stderr.startswith("Error: --scheduler tcp://127.0.0.1:9: cannot connect")
    assert out.stderr.count("\n") == 1


def test_the_whole_hostile_corpus_goes_through_the_audit(client, tmp_path, monkeypatch):
    """Every case of tests/make_bad_inputs.py audited: no crash; a case that ``report``
    accepts is an ok row, one it refuses an error row with a one-line message, or a
    note when it is not an adapter at all."""
    from make_bad_inputs import build_corpus
    from test_hostile import unreadable

    db = tmp_path / "corpus.sqlite"
    for case in build_corpus(tmp_path / "corpus"):
        with unreadable(case.unreadable, monkeypatch):
            result = ddiscan.audit([case.adapter], base=case.base, db=db, client=client)
        found = rows(db, "SELECT status, error FROM adapters WHERE path = ?", str(case.adapter))
        if case.code == 0:
            assert [status for status, _ in found] == ["ok"], (case.name, found)
        elif found:
            assert [status for status, _ in found] == ["error"], (case.name, found)
            assert "\n" not in found[0][1] and "Traceback" not in found[0][1], case.name
        else:
            assert any(str(case.adapter) in note for note in result.notes), (case.name, result.notes)


class _Failed:
    """A finished future whose result raises ``error``."""

    def __init__(self, error):
        self.error = error

    def result(self):
        raise self.error

    def release(self):
        pass


def test_a_task_that_killed_its_workers_is_an_error_row_but_a_lost_cluster_records_nothing(collection):
    from ddiscan.auditing.run import _row

    adapter = str(collection["ok"][0])
    killed = distributed.KilledWorker("score-1", SimpleNamespace(address="tcp://w:1"), 3)
    row = _row(_Failed(killed), adapter, "fp", {}, "{}")
    assert row["status"] == "error" and row["error"].startswith("not scanned: every worker that ran it died")
    assert row["sha256"] and row["base"] == "fp"
    with pytest.raises(ddiscan.InputError, match="the Dask cluster failed mid-audit .* run the audit again"):
        _row(_Failed(distributed.client.FutureCancelledError("score-1", "scheduler-connection-lost")), adapter, "fp",
             {}, "{}")


def test_scan_options_apply_and_are_recorded(collection, client, tmp_path):
    db = tmp_path / "a.sqlite"
    ddiscan.audit([collection["ok"][1]], db=db, client=client, t=2, seed=3, max_t=8)
    [(parameters, profile)] = rows(db, "SELECT a.parameters, b.profile FROM adapters a JOIN bases b "
                                       "ON b.fingerprint = a.base")
    recorded = json.loads(parameters)
    assert (recorded["t"], recorded["seed"], recorded["max_t"], recorded["method"]) == (2, 3, 8, "ddi")
    assert ddiscan.Profile(profile).parameters["seed"] == 3
    assert rows(db, "SELECT DISTINCT t FROM modules") == [(2,)]
    report = ddiscan.scan(profile, collection["ok"][1], t=2, seed=3)
    assert sorted(r[0] for r in rows(db, "SELECT ddi FROM modules")) == sorted(m.ddi for m in report.modules)
