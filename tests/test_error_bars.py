"""The error bar of O at work: which modules it leaves unranked, where it could move the cut
of a selection, and how `report` and `prune` say so (SPEC.md §2, README "How far to trust O")."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ddiscan.cli import cli
from ddiscan.select import ddi_bounds, select, undetermined, undetermined_at_cut
from selection_helpers import scored

ROOT = Path(__file__).resolve().parents[1]
BASE, ADAPTER = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "tiny-lora"
# a sketch with no oversampling and no iterations: t columns, nothing known beyond them
BLIND = ["--sketch", "subspace", "--power-iters", "0", "--oversample", "0"]


def module(name, ddi, error, o=0.5):
    return scored(name, ddi=ddi, deviation=o, deviation_error=error, ddi_norm=ddi / (1 + ddi))


def test_ddis_interval_scales_with_os():
    assert ddi_bounds(module("a", 0.2, 0.1)) == pytest.approx((0.16, 0.24))
    assert ddi_bounds(module("a", 0.2, 0.0)) == (0.2, 0.2)
    assert ddi_bounds(module("a", 0.2, None)) == (0.2, 0.2)  # unknown (a profile): nothing to say
    assert ddi_bounds(module("a", 0.2, 0.9)) == pytest.approx((0.0, 0.4))  # O clamped to [0, 1]


def test_neighbours_whose_intervals_overlap_are_undetermined():
    modules = [module("a", 0.30, 0.01), module("b", 0.20, 0.2), module("c", 0.18, 0.01), module("d", 0.05, 0.01)]
    assert [m.name for m in undetermined(modules)] == ["b", "c"]
    assert undetermined([module(n, v, 0.0) for n, v in zip("abc", (0.3, 0.3, 0.1))]) == []


def test_the_cut_of_top_and_theta_could_move_within_the_error_bars():
    modules = [module("a", 0.30, 0.01), module("b", 0.20, 0.1), module("c", 0.18, 0.01), module("d", 0.05, 0.01)]
    top2 = select(modules, top=2)
    assert [m.name for m in undetermined_at_cut(top2, modules)] == ["b", "c"]
    assert undetermined_at_cut(select(modules, top=1), modules) == []
    assert [m.name for m in undetermined_at_cut(select(modules, theta=0.21), modules)] == ["b"]
    assert undetermined_at_cut(select(modules, theta=0.1), modules) == []
    assert [m.name for m in undetermined_at_cut(select(modules, theta_norm=0.2 / 1.2), modules)] == ["b"]


def test_report_warns_and_marks_modules_a_blind_sketch_cannot_rank():
    result = CliRunner().invoke(cli, ["report", str(BASE), str(ADAPTER), *BLIND])
    assert result.exit_code == 0, result.output
    assert "O is not precise enough to rank them" in result.stderr and "--exact" in result.stderr
    rows = result.stdout.splitlines()[1:-1]
    assert all(row.split()[0].endswith("?") for row in rows)
    assert "? = O not precise enough to rank" in result.stdout.splitlines()[-1]


def test_report_json_carries_gap_and_error_bar_and_exact_has_none(tmp_path):
    out = tmp_path / "r.json"
    assert CliRunner().invoke(cli, ["report", str(BASE), str(ADAPTER), *BLIND, "-o", str(out)]).exit_code == 0
    rows = json.loads(out.read_text())["modules"]
    assert all(m["deviation_error"] == 1.0 for m in rows)  # t columns: nothing is known of what lies beyond
    result = CliRunner().invoke(cli, ["report", str(BASE), str(ADAPTER), "--exact", "-o", str(out)])
    assert result.exit_code == 0 and "precise enough" not in result.stderr
    rows = json.loads(out.read_text())["modules"]
    assert all(m["deviation_error"] == 0.0 and m["gap"] >= 1.0 for m in rows)


def test_prune_says_when_its_selection_could_change(tmp_path):
    result = CliRunner().invoke(cli, ["prune", str(BASE), str(ADAPTER), "--top", "2", "--dry-run", *BLIND])
    assert result.exit_code == 0, result.output
    assert "could change within the error bars of O" in result.stderr and "--exact" in result.stderr
    exact = CliRunner().invoke(cli, ["prune", str(BASE), str(ADAPTER), "--top", "2", "--dry-run", "--exact"])
    assert exact.exit_code == 0 and "could change" not in exact.stderr
