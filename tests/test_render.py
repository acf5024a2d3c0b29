"""Output formats, the terminal heatmap and the --plot picture."""

import csv
import io
import json
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

from click.testing import CliRunner

import ddiscan
from ddiscan.cli import cli
from ddiscan.plot import DPI, SIZE_INCHES
from ddiscan.render import COLUMNS, FORMATS, SHADES, heatmap, render

ROOT = Path(__file__).resolve().parents[1]
BASE, ADAPTER = str(ROOT / "fixtures" / "tiny-llama"), str(ROOT / "fixtures" / "tiny-lora")
REPORT = ddiscan.scan(BASE, ADAPTER)


def test_every_format_parses_and_lists_every_module():
    assert FORMATS == ("table", "json", "jsonl", "csv", "markdown")
    names = [m.name for m in REPORT.modules]
    assert [m["name"] for m in json.loads(render(REPORT, "json"))["modules"]] == names
    lines = [json.loads(line) for line in render(REPORT, "jsonl").splitlines()]
    assert [r["name"] for r in lines] == names and {r["adapter"] for r in lines} == {ADAPTER}
    assert [r["rank"] for r in lines] == list(range(1, 9))
    rows = list(csv.DictReader(io.StringIO(render(REPORT, "csv"))))
    assert [r["name"] for r in rows] == names
    assert float(rows[0]["ddi"]) == REPORT.modules[0].ddi  # full precision, not rounded
    md = render(REPORT, "markdown").splitlines()
    assert md[0] == "| " + " | ".join(COLUMNS) + " |" and len(md) == 2 + len(names)
    table = render(REPORT, "table").splitlines()
    assert table[0].split() == list(COLUMNS) and len(table) == 2 + len(names)


def test_heatmap_shades_blocks_by_kind_without_colour():
    text = heatmap(REPORT)
    lines = text.splitlines()
    assert lines[0].split() == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert lines[1].split()[0] == "0" and lines[2].split()[0] == "1"
    # the planted sharp, off-subspace v_proj of block 1 is the darkest cell; q_proj of block 0 is light
    assert lines[2].split()[4] == SHADES[-1] * 3
    assert lines[1].split()[3] in ("···", SHADES[1] * 3)
    assert "\x1b[" not in text
    coloured = heatmap(REPORT, color=True)
    assert "\x1b[38;5;" in coloured and coloured.count("\x1b[0m") == 3 * 8


def test_cli_heatmap_and_formats():
    runner = CliRunner()
    for fmt in FORMATS:
        result = runner.invoke(cli, ["report", BASE, ADAPTER, "--format", fmt], catch_exceptions=False)
        assert result.exit_code == 0 and result.stdout == render(REPORT, fmt)
    result = runner.invoke(cli, ["report", BASE, ADAPTER, "--heatmap"], catch_exceptions=False)
    assert result.stdout == render(REPORT, "table") + heatmap(REPORT)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_and_an_svg_of_the_expected_size(tmp_path):
    runner = CliRunner()
    png, svg = tmp_path / "r.png", tmp_path / "p.svg"
    assert runner.invoke(cli, ["report", BASE, ADAPTER, "--plot", str(png)]).exit_code == 0
    assert _png_size(png.read_bytes()) == (int(SIZE_INCHES[0] * DPI), int(SIZE_INCHES[1] * DPI))
    result = runner.invoke(cli, ["prune", BASE, ADAPTER, "--top", "3", "--dry-run", "--plot", str(svg)])
    assert result.exit_code == 0
    root = ET.fromstring(svg.read_bytes())
    assert root.tag.endswith("svg") and root.get("width") == f"{SIZE_INCHES[0] * 72:g}pt"
    assert b"top 3" in svg.read_bytes()
    bad = runner.invoke(cli, ["report", BASE, ADAPTER, "--plot", str(tmp_path / "x.gif")])
    assert bad.exit_code == 2 and ".png or .svg" in bad.stderr and not (tmp_path / "x.gif").exists()
