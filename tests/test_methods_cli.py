"""--method safelora|splora, --mode project and --components through the command line,
on the bundled aligned/unaligned pair, against a dense float64 reference that forms C."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import ddiscan
from ddiscan.cli import cli
from ddiscan.io import SafetensorsFile, TensorIndex

ROOT = Path(__file__).resolve().parents[1]
BASE, ADAPTER = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "tiny-lora"
UNALIGNED = ROOT / "fixtures" / "tiny-llama-unaligned.safetensors"
PAIR = ["--aligned", str(BASE), "--unaligned", str(UNALIGNED)]


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _dense(module_name):
    """C (d × d), ΔW (d × k) and lora_B for one module, formed explicitly in float64."""
    key = f"model.layers.{module_name.split('.')[2]}.self_attn.{module_name.rsplit('.', 1)[-1]}.weight"
    a = (np.asarray(TensorIndex(BASE).array(key), dtype=np.float64)
         - np.asarray(TensorIndex(UNALIGNED).array(key), dtype=np.float64))
    c = a @ a.T / np.linalg.norm(a)
    f = SafetensorsFile(ADAPTER / "adapter_model.safetensors")
    up = np.asarray(f.array(f"base_model.model.{module_name}.lora_B.weight"), dtype=np.float64)
    down = np.asarray(f.array(f"base_model.model.{module_name}.lora_A.weight"), dtype=np.float64)
    return c, 2.0 * up @ down, up


def test_safelora_cosines_equal_the_dense_reference_and_rank_lowest_first():
    report = ddiscan.scan(BASE, ADAPTER, method="safelora", aligned=BASE, unaligned=UNALIGNED)
    assert report.method == "safelora" and report.parameters["aligned"] == str(BASE)
    cosines = [m.cosine for m in report.modules]
    assert cosines == sorted(cosines)
    for m in report.modules:
        c, delta, _ = _dense(m.name)
        x = c @ delta
        expected = float(np.sum(x * delta) / (np.linalg.norm(x) * np.linalg.norm(delta)))
        assert m.cosine == pytest.approx(expected, rel=1e-5), m.name
        assert m.ddi is None and m.ediem is None


def test_splora_ranks_highest_ediem_first_and_is_deterministic():
    kwargs = dict(method="splora", aligned=BASE, unaligned=UNALIGNED)
    first, again = ddiscan.scan(BASE, ADAPTER, **kwargs), ddiscan.scan(BASE, ADAPTER, **kwargs)
    assert first.to_json() == again.to_json()
    scores = [m.ediem for m in first.modules]
    assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))


def test_components_ablation_is_the_product_of_the_chosen_ones():
    full = {m.name: m for m in ddiscan.scan(BASE, ADAPTER).modules}
    so = ddiscan.scan(BASE, ADAPTER, components=("S", "O"))
    assert so.parameters["components"] == ["S", "O"]
    for m in so.modules:
        assert m.ddi == pytest.approx(full[m.name].sharpness * full[m.name].deviation, rel=1e-12)
        assert m.ddi_raw == pytest.approx(full[m.name].ddi_raw, rel=1e-12)
    result = _run("report", BASE, ADAPTER, "--components", "O,M", "--format", "json")
    assert result.exit_code == 0 and json.loads(result.stdout)["parameters"]["components"] == ["O", "M"]
    assert _run("report", BASE, ADAPTER, "--components", "S,X").exit_code == 2


def test_project_rewrite_sets_lora_b_to_c_times_lora_b(tmp_path):
    out = tmp_path / "projected"
    result = _run("prune", BASE, ADAPTER, "--method", "safelora", *PAIR, "--top", "2", "--rewrite", "project",
                  "-o", out, "--report-out", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    chosen = json.loads((tmp_path / "r.json").read_text())["selection"]["pruned"]
    src = SafetensorsFile(ADAPTER / "adapter_model.safetensors")
    dst = SafetensorsFile(out / "adapter_model.safetensors")
    assert list(src.keys()) == list(dst.keys())
    for key in src.keys():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        if module in chosen and ".lora_B." in key:
            c, _, up = _dense(module)
            np.testing.assert_allclose(np.asarray(dst.array(key), dtype=np.float64), c @ up, rtol=1e-5, atol=1e-8)
        else:
            assert dst.raw_bytes(key) == src.raw_bytes(key), key
    assert dst.metadata["ddiscan.mode"] == "project"


def test_check_with_safelora_and_usage_errors(tmp_path):
    bad = _run("check", "--base", BASE, "--method", "safelora", *PAIR, "--min-cosine", "0.1", ADAPTER)
    assert bad.exit_code == 1
    assert bad.stdout.splitlines() == [
        f"{ADAPTER / 'adapter_model.safetensors'}:1: model.layers.1.self_attn.q_proj: cosine 0.0795239 < 0.1"]
    assert _run("check", "--base", BASE, "--method", "safelora", *PAIR, "--max-ddi", "1", ADAPTER).exit_code == 2
    missing = _run("report", BASE, ADAPTER, "--method", "splora", "--aligned", BASE)
    assert missing.exit_code == 2 and missing.stderr == "Error: --method splora needs both --aligned and --unaligned\n"
    assert _run("report", BASE, ADAPTER, "--aligned", BASE, "--unaligned", UNALIGNED).exit_code == 2
    assert _run("report", BASE, ADAPTER, "--method", "safelora", *PAIR, "--heatmap").exit_code == 2
    no_norm = _run("prune", BASE, ADAPTER, "--method", "safelora", *PAIR, "--theta-norm", "0.1", "--dry-run")
    assert no_norm.exit_code == 2
    assert _run("prune", BASE, ADAPTER, "--rewrite", "project", "--top", "1", "-o", tmp_path / "x").exit_code == 2


def test_project_from_a_report_takes_the_pair_from_the_report(tmp_path):
    report = tmp_path / "r.json"
    assert _run("report", BASE, ADAPTER, "--method", "safelora", *PAIR, "-o", report).exit_code == 0
    again = tmp_path / "again"
    direct = tmp_path / "direct"
    assert _run("prune", "--from-report", report, "--top", "2", "--rewrite", "project", "-o", again).exit_code == 0
    assert _run("prune", BASE, ADAPTER, "--method", "safelora", *PAIR, "--top", "2", "--rewrite", "project",
                "-o", direct).exit_code == 0
    assert (again / "adapter_model.safetensors").read_bytes() == (direct / "adapter_model.safetensors").read_bytes()
