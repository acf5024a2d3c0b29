-- ddiscan audit result database, schema version 1 (README.md, "Audit database").
-- One writer (the audit's client) commits results in transactions; WAL mode.
PRAGMA user_version = 1;

CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- one row per base that adapters were scored against
CREATE TABLE IF NOT EXISTS bases (
    id          INTEGER PRIMARY KEY,
    fingerprint TEXT NOT NULL UNIQUE,   -- sha256 over the base files' sha256s (or the profile's)
    path        TEXT NOT NULL,
    profile     TEXT                    -- the .ddiprofile the scores came from, if any
);

-- one row per (adapter content, base, parameters): a rescan of the same triple is a no-op
CREATE TABLE IF NOT EXISTS adapters (
    id              INTEGER PRIMARY KEY,
    key             TEXT NOT NULL UNIQUE, -- sha256 of (sha256 and the config's sha256, or the path when
                                          -- unreadable; base; parameters): the row's identity
    path            TEXT NOT NULL,
    sha256          TEXT NOT NULL,      -- of the adapter's weights file ('' when it cannot be read)
    size            INTEGER NOT NULL,   -- bytes
    base            TEXT,               -- bases.fingerprint, NULL when no base was found
    status          TEXT NOT NULL CHECK (status IN ('ok', 'error')),
    error           TEXT,               -- ddiscan's one-line message when status = 'error'
    n_modules       INTEGER,
    max_ddi         REAL,
    parameters      TEXT NOT NULL,      -- canonical JSON of the scan parameters
    scanned_at      TEXT NOT NULL,      -- ISO 8601, UTC
    ddiscan_version TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS modules (
    adapter_id INTEGER NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
    module     TEXT NOT NULL,
    kind       TEXT,
    block      INTEGER,
    d          INTEGER NOT NULL,
    k          INTEGER NOT NULL,
    r          INTEGER NOT NULL,
    scale      REAL,                    -- the scale s of ΔW = s·U·V (SPEC.md §1); not "s": SQLite names ignore case, and S is sharpness
    t          INTEGER NOT NULL,
    S          REAL,
    O          REAL,
    M          REAL,
    M_norm     REAL,
    ddi        REAL,
    ddi_norm   REAL,
    delta_norm REAL,
    base_norm  REAL,
    cosine     REAL,                    -- SafeLoRA's score (method safelora)
    ediem      REAL,                    -- SPLoRA's score (method splora)
    PRIMARY KEY (adapter_id, module)
);

-- the sha256 of every file read (adapters' weights and configs, bases), by path, size and
-- mtime: a rerun knows an unchanged file's digest without reading it
CREATE TABLE IF NOT EXISTS files (
    path     TEXT PRIMARY KEY,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256   TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS adapters_by_risk ON adapters (status, max_ddi DESC);
CREATE INDEX IF NOT EXISTS adapters_by_path ON adapters (path);
CREATE INDEX IF NOT EXISTS modules_by_kind ON modules (kind, ddi DESC);
