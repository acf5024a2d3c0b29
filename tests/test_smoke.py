"""The bundled example scans end to end, through the library and the command line."""

from pathlib import Path

from click.testing import CliRunner

import ddiscan
from ddiscan.cli import cli

ROOT = Path(__file__).resolve().parents[1]
BASE, ADAPTER = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "tiny-lora"


def test_fixture_ranks_the_planted_modules():
    report = ddiscan.scan(BASE, ADAPTER)
    names = [m.name for m in report.modules]
    assert len(names) == 8
    assert names[0] == "model.layers.1.self_attn.v_proj"
    assert names[-1] == "model.layers.0.self_attn.q_proj"


def test_cli_table_lists_every_module():
    result = CliRunner().invoke(cli, ["report", str(BASE), str(ADAPTER)], catch_exceptions=False)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split()[:2] == ["rank", "module"]
    assert lines[1].split()[1] == "model.layers.1.self_attn.v_proj"
    assert lines[-1].startswith("8 modules; DDI min")
