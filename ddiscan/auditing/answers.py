"""The audit's answers as text: the top adapters by max DDI in the formats of ``report``
(``table``, ``csv``, ``json``, ``markdown``), and the one-line summary of a run."""

from __future__ import annotations

import csv
import io
import json

from ..errors import printable
from ..render import _aligned, _number
from .db import TOP_COLUMNS

__all__ = ["TOP_FORMATS", "render_top", "summary"]

TOP_FORMATS = ("table", "csv", "json", "markdown")
_HEADER = ("rank", *TOP_COLUMNS)


def _cells(rank: int, row: dict) -> tuple[str, ...]:
    shown = {**row, "max_ddi": _number(row["max_ddi"]), "base": (row["base"] or "")[:12],
             "sha256": row["sha256"][:12]}
    return (str(rank), *(printable("" if shown[c] is None else shown[c]) for c in TOP_COLUMNS))


def render_top(rows: list[dict], fmt: str) -> str:
    """``rows`` (Database.top) ranked from 1; CSV and JSON keep full digests and numbers."""
    if fmt == "json":
        return json.dumps([{"rank": i + 1, **row} for i, row in enumerate(rows)], indent=2, allow_nan=False) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(_HEADER)
        writer.writerows([i + 1, *(printable(r[c]) if isinstance(r[c], str) else r[c] for c in TOP_COLUMNS)]
                         for i, r in enumerate(rows))
        return out.getvalue()
    cells = [_cells(i + 1, row) for i, row in enumerate(rows)]
    if fmt == "markdown":
        lines = ["| " + " | ".join(_HEADER) + " |", "|" + "|".join("---:" for _ in _HEADER) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]) + "\n"
    return "\n".join(_aligned([_HEADER, *cells], left={1, 4, 5, 6})) + "\n"


def summary(result, counts: dict) -> str:
    """One line: what this run did, and what the database holds."""
    return (f"ddiscan audit: {result.scanned} adapter(s) scanned ({result.errors} error(s)), {result.skipped} "
            f"skipped as done; {printable(result.db)} holds {counts['ok']} ok and {counts['error']} error row(s)")
