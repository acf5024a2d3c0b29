"""Reports as text: a table, JSON, JSON Lines, CSV, Markdown, and a block × kind heatmap.

Column names (README, "Output formats"): ``rank module kind block d k r t S O M_norm DDI
DDI_norm`` in the table and Markdown; every ModuleScore field in CSV and JSON Lines.
Names come from files: every format but JSON and JSON Lines (which escape by themselves and
keep names exact) prints them through :func:`ddiscan.errors.printable`.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, fields

import numpy as np

from .errors import printable
from .report import SCORES, ModuleScore, Report
from .select import undetermined

__all__ = ["FORMATS", "COLUMNS", "render", "heatmap"]

FORMATS = ("table", "json", "jsonl", "csv", "markdown")
COLUMNS = ("rank", "module", "kind", "block", "d", "k", "r", "t", "S", "O", "M_norm", "DDI", "DDI_norm")
# The other methods (ddiscan.safelora, ddiscan.ediem) show S and their own score instead of O, M_norm, DDI.
METHOD_COLUMNS = {method: (("S", "sharpness"), (label, field))
                  for method, (field, label, _) in SCORES.items() if method != "ddi"}
SHADES = " ░▒▓█"


def _number(value) -> str:
    return "nan" if value is None else f"{value:.6g}"


def _columns(report: Report) -> tuple[str, ...]:
    extra = METHOD_COLUMNS.get(report.method)
    return COLUMNS if extra is None else (*COLUMNS[:8], *(label for label, _ in extra))


def _rows(report: Report, marked=frozenset()):
    extra = METHOD_COLUMNS.get(report.method)
    for i, m in enumerate(report.modules):
        scores = ((m.sharpness, m.deviation, m.magnitude_norm, m.ddi, m.ddi_norm) if extra is None
                  else tuple(getattr(m, name) for _, name in extra))
        yield (
            (str(i + 1) + ("?" if m.name in marked else "")) if m.finite else "-", printable(m.name), printable(m.kind),
            "" if m.block is None else str(m.block),
            str(m.d), str(m.k), str(m.r), str(m.t), *(_number(v) for v in scores),
        )


def _aligned(rows, left=frozenset()) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def _footer(report: Report) -> str:
    s = report.summary
    footer = f"{s['modules']} modules"
    if s.get("ddi"):
        q = s["ddi"]
        footer += f"; DDI min {_number(q['min'])}, median {_number(q['median'])}, max {_number(q['max'])}"
    if s.get("non_finite"):
        footer += f"; {s['non_finite']} not finite"
    return footer


def _table(report: Report) -> str:
    marked = {m.name for m in undetermined(report.modules)} if report.method == "ddi" else set()
    footer = _footer(report) + (f"; ? = O not precise enough to rank ({len(marked)} modules; --exact settles it)"
                                if marked else "")
    return "\n".join(_aligned([_columns(report), *_rows(report, marked)], left={1, 2})) + "\n" + footer + "\n"


def _records(report: Report):
    for i, m in enumerate(report.modules):
        yield {"rank": i + 1 if m.finite else None, **asdict(m)}


def _csv(report: Report) -> str:
    out = io.StringIO()
    names = ["rank", *(f.name for f in fields(ModuleScore))]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(names)
    for record in _records(report):
        writer.writerow(["" if record[n] is None else printable(record[n]) if isinstance(record[n], str)
                         else record[n] for n in names])
    return out.getvalue()


def _jsonl(report: Report) -> str:
    adapter = report.inputs["adapter"]["path"]
    return "".join(json.dumps({"adapter": adapter, **r}, allow_nan=False) + "\n" for r in _records(report))


def _markdown(report: Report) -> str:
    columns = _columns(report)
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join(":---" if c in ("module", "kind") else "---:" for c in columns) + "|"]
    for row in _rows(report):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines) + "\n"


def render(report: Report, fmt: str) -> str:
    """The report as ``table``, ``json``, ``jsonl``, ``csv`` or ``markdown`` text."""
    return {"table": _table, "json": Report.to_json, "jsonl": _jsonl, "csv": _csv, "markdown": _markdown}[fmt](report)


def grid(report: Report) -> tuple[list, list[str], np.ndarray]:
    """DDI by block (rows, ``None`` for modules outside any block) and kind (columns);
    NaN where a block has no such module or its scores are not finite."""
    blocks = sorted({m.block for m in report.modules}, key=lambda b: (b is None, b or 0))
    kinds = list(dict.fromkeys(m.kind for m in sorted(report.modules, key=lambda m: m.base_key)))
    values = np.full((len(blocks), len(kinds)), np.nan)
    for m in report.modules:
        if m.finite:
            values[blocks.index(m.block), kinds.index(m.kind)] = m.ddi
    return blocks, kinds, values


def heatmap(report: Report, *, color: bool = False) -> str:
    """DDI by block and module kind as shading characters (``░▒▓█``, scaled to the largest
    DDI; blank where there is no module, ``?`` where it is not finite), with ANSI colour
    when ``color`` is true."""
    blocks, kinds, values = grid(report)
    top = np.nanmax(values) if np.isfinite(values).any() else 0.0
    present = {(m.block, m.kind) for m in report.modules}

    def cell(i, j):
        value = values[i, j]
        if (blocks[i], kinds[j]) not in present:
            return " "
        if np.isnan(value):
            return "?"
        level = 0 if top <= 0 else min(len(SHADES) - 1, int(np.ceil(value / top * (len(SHADES) - 1))))
        char = SHADES[level] if level else "·"
        if color:
            shade = 232 + round(level / (len(SHADES) - 1) * 23)
            return f"\x1b[38;5;{shade}m{char}\x1b[0m"
        return char

    labels = [printable(k) for k in kinds]
    width = max(len(k) for k in labels)
    label = max(len("block"), *(len(str(b)) for b in blocks))
    lines = [" " * label + "  " + "  ".join(k.center(width) for k in labels)]
    for i, b in enumerate(blocks):
        row = "  ".join((cell(j=j, i=i) * 3).center(width) if not color else cell(i, j) * 3 + " " * (width - 3)
                        for j in range(len(kinds)))
        lines.append(("-" if b is None else str(b)).rjust(label) + "  " + row.rstrip())
    lines.append(f"scale: · 0  ░ ▒ ▓ █ up to {_number(top)} (largest DDI); blank: no module; ?: not finite")
    return "\n".join(lines) + "\n"
