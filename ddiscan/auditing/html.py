"""The audit's result database as one self-contained HTML page: a sortable table of the
adapters and, per adapter, its block × kind DDI heatmap and its sorted DDI curve.

The page loads nothing: its style and script (``page.css``, ``page.js``) are inline, and a
Content-Security-Policy allows exactly those two (by their sha256) and nothing remote. Every
string in the database came from an adapter's file, so the table's text is HTML-escaped,
the module scores travel as JSON in a data block whose ``<``, ``>``, ``&``, U+2028 and
U+2029 are ``\\u`` escapes, and the script builds the charts with ``textContent`` only.
"""

from __future__ import annotations

import base64
import hashlib
import html
import itertools
import json
import math
import sqlite3
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from ..errors import InputError, printable
from ..io.writer import refuse_input_as_output, write_atomic_stream

__all__ = ["write_html", "SCHEMA_VERSION", "COLUMNS"]

SCHEMA_VERSION = 1
# the table's columns: (name, sort type)
COLUMNS = (("path", "text"), ("status", "text"), ("n_modules", "number"), ("max_ddi", "number"),
           ("base", "text"), ("error", "text"))
RISK_ORDER = "a.max_ddi IS NULL, a.max_ddi DESC, a.path, a.id"
ADAPTERS = f"""SELECT a.id, a.path, a.status, a.n_modules, a.max_ddi, COALESCE(b.path, a.base), a.error
FROM adapters a LEFT JOIN bases b ON b.fingerprint = a.base ORDER BY {RISK_ORDER}"""
MODULES = f"""SELECT a.id, a.path, m.module, m.kind, m.block, m.ddi
FROM modules m JOIN adapters a ON a.id = m.adapter_id WHERE a.status = 'ok' ORDER BY {RISK_ORDER}, m.module"""
JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def write_html(db_path, out_path) -> None:
    """Write the audit database ``db_path`` (read only) as one HTML page to ``out_path``,
    atomically. InputError when ``db_path`` is not a readable audit database of schema
    version 1; UsageError when ``out_path`` is the database itself."""
    refuse_input_as_output(out_path, [db_path])
    with _reading(db_path) as connection:
        counts = dict(connection.execute("SELECT status, count(*) FROM adapters GROUP BY status").fetchall())
        write_atomic_stream(out_path, lambda f: _fill(f, connection, db_path, counts))


@contextmanager
def _reading(db_path):
    """A read-only connection to ``db_path``, its schema version checked; sqlite3's errors
    become one-line InputErrors."""
    path = Path(db_path)
    where = printable(path)
    if not path.is_file():
        raise InputError(f"{where}: no such audit database (not a regular file)")
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise InputError(f"{where}: cannot open the audit database ({printable(exc)})") from None
    connection.text_factory = lambda raw: raw.decode("utf-8", "replace")
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise InputError(f"{where}: not a ddiscan audit database of schema version {SCHEMA_VERSION} "
                             f"(its version is {version})")
        connection.execute("BEGIN")  # one read transaction: one snapshot, while an audit may be committing
        yield connection
    except sqlite3.Error as exc:
        raise InputError(f"{where}: cannot read the audit database ({printable(exc)})") from None
    finally:
        connection.close()


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def _text(value) -> str:
    """A string from the database as HTML text or attribute value."""
    return "" if value is None else html.escape(printable(value), quote=True)


def _finite(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _number_cell(value) -> str:
    number = _finite(value)
    if number is None:
        return '<td class="num" data-v=""></td>'
    exact, shown = (str(value), str(value)) if isinstance(value, int) else (repr(number), f"{number:.6g}")
    return f'<td class="num" data-v="{exact}">{shown}</td>'


def _row(row) -> str:
    adapter_id, path, status, n_modules, max_ddi, base, error = row
    shown = _text(path)
    if status == "ok" and isinstance(adapter_id, int):
        shown = f'<a href="#a{adapter_id}">{shown}</a>'
    return (f'<tr><td class="path"><div>{shown}</div></td><td class="status {_text(status)}">{_text(status)}</td>'
            f"{_number_cell(n_modules)}{_number_cell(max_ddi)}<td><div>{_text(base)}</div></td>"
            f'<td class="error"><div>{_text(error)}</div></td></tr>\n')


def _json(value) -> str:
    """``value`` as JSON that cannot end or open anything inside a ``<script>`` element."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return "".join(JSON_ESCAPES.get(c, c) for c in text)


def _adapters_json(connection):
    """The data block's text in pieces: a JSON array of {id, path, m: [[module, kind,
    block, ddi], ...]} per scored adapter, riskiest first, one adapter in memory at a time."""
    yield "["
    for i, (adapter_id, rows) in enumerate(itertools.groupby(connection.execute(MODULES), key=lambda r: r[0])):
        rows = list(rows)
        modules = [[printable(name), "" if kind is None else printable(kind),
                    block if isinstance(block, int) else None, _finite(ddi)] for _, _, name, kind, block, ddi in rows]
        yield ("," if i else "") + _json({"id": adapter_id, "path": printable(rows[0][1]), "m": modules})
    yield "]"


def _head(db_path, counts: dict, style: str, script: str) -> str:
    policy = (f"default-src 'none'; script-src {_digest(script)}; style-src {_digest(style)}; "
              "img-src 'none'; connect-src 'none'; base-uri 'none'; form-action 'none'")
    total = sum(counts.values())
    header = "".join(f'<th data-type="{kind}" aria-sort="none"><button type="button">{name}</button></th>'
                     for name, kind in COLUMNS)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>ddiscan audit: {total} adapters</title>\n<style>{style}</style></head>\n<body>\n"
        f"<h1>ddiscan audit</h1>\n<p>{_text(db_path)}: {total} adapters, {counts.get('ok', 0)} scored, "
        f"{counts.get('error', 0)} errors. Click a column header to sort; click a scored adapter's "
        "path for its DDI by block and module kind and its modules sorted by DDI.</p>\n"
        f'<table id="adapters"><thead><tr>{header}</tr></thead>\n<tbody>\n'
    )


def _fill(f, connection, db_path, counts: dict) -> None:
    style, script = _asset("page.css"), _asset("page.js")

    def write(text: str) -> None:
        f.write(text.encode("utf-8"))

    write(_head(db_path, counts, style, script))
    for row in connection.execute(ADAPTERS):
        write(_row(row))
    write('</tbody></table>\n<h2>Scored adapters</h2>\n<section id="details"></section>\n'
          '<script type="application/json" id="modules">')
    for piece in _adapters_json(connection):
        write(piece)
    write(f"</script>\n<script>{script}</script>\n</body></html>\n")
