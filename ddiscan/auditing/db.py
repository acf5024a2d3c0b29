"""The audit's result database: SQLite (the standard library's sqlite3) in WAL mode, one
writer (the audit's client), every batch of results one transaction, every write an
idempotent upsert keyed by the row's identity (``schema.sql``, version 1)."""

from __future__ import annotations

import sqlite3
from importlib import resources
from pathlib import Path

from ..errors import InputError, OutputError, printable

__all__ = ["Database", "SCHEMA_VERSION", "ADAPTER_COLUMNS", "MODULE_COLUMNS", "TOP_COLUMNS"]

SCHEMA_VERSION = 1
ADAPTER_COLUMNS = ("key", "path", "sha256", "size", "base", "status", "error", "n_modules", "max_ddi",
                   "parameters", "scanned_at", "ddiscan_version")
MODULE_COLUMNS = ("module", "kind", "block", "d", "k", "r", "scale", "t", "S", "O", "M", "M_norm", "ddi", "ddi_norm",
                  "delta_norm", "base_norm", "cosine", "ediem")
TOP_COLUMNS = ("path", "max_ddi", "n_modules", "base", "sha256", "scanned_at")


class Database:
    """An audit database opened (created with ``create``, else it must exist)."""

    def __init__(self, path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise InputError(f"{printable(path)}: no such audit database")
        try:
            self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self._open(create)
        except sqlite3.DatabaseError as exc:
            error = OutputError if create else InputError
            raise error(f"{printable(path)}: not a usable audit database ({exc})") from None

    def _open(self, create: bool) -> None:
        conn = self.conn
        conn.execute("PRAGMA foreign_keys = ON")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
            if not create:
                raise InputError(f"{printable(self.path)}: an empty database, not an audit")
            conn.execute("PRAGMA journal_mode = WAL")
            schema = resources.files("ddiscan.auditing").joinpath("schema.sql").read_text(encoding="utf-8")
            conn.executescript(f"BEGIN;\n{schema}\nCOMMIT;")
        elif version != SCHEMA_VERSION:
            raise InputError(f"{printable(self.path)}: not a ddiscan audit database of schema version "
                             f"{SCHEMA_VERSION} (user_version {version})")
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL: a committed transaction survives a killed process

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- reading -------------------------------------------------------------------------

    def digest(self, path: str, size: int, mtime_ns: int) -> str | None:
        """The sha256 recorded for ``path`` if the file still has that size and mtime."""
        row = self.conn.execute("SELECT sha256 FROM files WHERE path = ? AND size = ? AND mtime_ns = ?",
                                (path, size, mtime_ns)).fetchone()
        return row[0] if row else None

    def is_done(self, key: str, retry_errors: bool) -> bool:
        row = self.conn.execute("SELECT status FROM adapters WHERE key = ?", (key,)).fetchone()
        return row is not None and (row[0] == "ok" or not retry_errors)

    def top(self, n: int) -> list[dict]:
        """The ``n`` ok adapters of highest max DDI (ties by path)."""
        cursor = self.conn.execute(
            f"SELECT {', '.join(TOP_COLUMNS)} FROM adapters WHERE status = 'ok' AND max_ddi IS NOT NULL "
            "ORDER BY max_ddi DESC, path LIMIT ?", (n,))
        return [dict(zip(TOP_COLUMNS, row)) for row in cursor]

    def counts(self) -> dict[str, int]:
        counts = dict(self.conn.execute("SELECT status, count(*) FROM adapters GROUP BY status").fetchall())
        return {"ok": counts.get("ok", 0), "error": counts.get("error", 0)}

    # -- writing -------------------------------------------------------------------------

    def put_base(self, fingerprint: str, path: str, profile: str | None) -> None:
        with self._transaction():
            self.conn.execute("INSERT INTO bases (fingerprint, path, profile) VALUES (?, ?, ?) ON CONFLICT "
                              "(fingerprint) DO UPDATE SET path = excluded.path, profile = excluded.profile",
                              (fingerprint, path, profile))

    def put_files(self, files) -> None:
        with self._transaction():
            self._files(files)

    def write(self, rows) -> None:
        """Each row (an adapter's columns, its ``modules`` and the ``files`` read), all in one transaction."""
        with self._transaction():
            for row in rows:
                self._files(row["files"])
                self._adapter(row)

    def _transaction(self):
        return _Transaction(self.conn)

    def _files(self, files) -> None:
        self.conn.executemany("INSERT INTO files (path, size, mtime_ns, sha256) VALUES (?, ?, ?, ?) ON CONFLICT "
                              "(path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
                              "sha256 = excluded.sha256", files)

    def _adapter(self, row: dict) -> None:
        """Upsert one adapter: an ok row already there is kept (its path the first of the
        paths holding that content); anything else is replaced, with its modules. Rows for
        other contents of the same path (same parameters, same base or none) go first."""
        conn = self.conn
        conn.execute("DELETE FROM adapters WHERE key != ? AND path = ? AND parameters = ? AND (base IS ? OR base "
                     "IS NULL)", (row["key"], row["path"], row["parameters"], row["base"]))
        found = conn.execute("SELECT id, status FROM adapters WHERE key = ?", (row["key"],)).fetchone()
        if found and found[1] == "ok":
            conn.execute("UPDATE adapters SET path = min(path, ?) WHERE id = ?", (row["path"], found[0]))
            return
        conn.execute("DELETE FROM adapters WHERE key = ?", (row["key"],))
        cursor = conn.execute(f"INSERT INTO adapters ({', '.join(ADAPTER_COLUMNS)}) VALUES "
                              f"({', '.join('?' * len(ADAPTER_COLUMNS))})", [row[c] for c in ADAPTER_COLUMNS])
        conn.executemany(f"INSERT INTO modules (adapter_id, {', '.join(MODULE_COLUMNS)}) VALUES "
                         f"(?, {', '.join('?' * len(MODULE_COLUMNS))})",
                         [(cursor.lastrowid, *module) for module in row["modules"]])


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on an exception)."""

    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, *exc):
        self.conn.execute("ROLLBACK" if kind else "COMMIT")
