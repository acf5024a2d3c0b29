"""Base profiles, ddiscan check, and many adapters against one base."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

import ddiscan
from ddiscan.cli import cli
from ddiscan.io.reader import SafetensorsFile
from ddiscan.profile import Profile, build_profile

ROOT = Path(__file__).resolve().parents[1]
BASE, ADAPTER = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "tiny-lora"
FIELDS = ("sharpness", "deviation", "magnitude", "magnitude_norm", "ddi", "ddi_raw", "ddi_norm",
          "delta_norm", "base_norm")


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _same_scores(a, b, rel=1e-6):
    assert [m.name for m in a.modules] == [m.name for m in b.modules]
    for x, y in zip(a.modules, b.modules):
        assert (x.d, x.k, x.r, x.t, x.scale, x.base_key) == (y.d, y.k, y.r, y.t, y.scale, y.base_key)
        for f in FIELDS:
            assert getattr(x, f) == pytest.approx(getattr(y, f), rel=rel, abs=1e-12), (x.name, f)


def _second_adapter(tmp_path, scale=3.0, rank=None):
    """A copy of the fixture adapter with different factors (same keys)."""
    out = tmp_path / f"lora-{scale}"
    shutil.copytree(ADAPTER, out)
    tensors = load_file(out / "adapter_model.safetensors")
    rng = np.random.default_rng(int(scale * 10))
    for key in tensors:
        tensors[key] = (tensors[key] + rng.standard_normal(tensors[key].shape).astype(np.float32) * 0.01 * scale)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("exact", [False, True])
def test_profile_scores_as_the_base_does(tmp_path, exact):
    prof = tmp_path / "tiny.ddiprofile"
    build_profile(BASE, prof, max_t=4, exact=exact)  # the fixture adapter has r = 4
    _same_scores(ddiscan.scan(prof, ADAPTER, exact=exact), ddiscan.scan(BASE, ADAPTER, exact=exact))


def test_a_wider_profile_is_a_prefix_and_at_least_as_accurate(tmp_path):
    prof = tmp_path / "wide.ddiprofile"
    build_profile(BASE, prof, max_t=16)
    exact = {m.name: m.deviation for m in ddiscan.scan(BASE, ADAPTER, exact=True).modules}
    narrow = {m.name: m.deviation for m in ddiscan.scan(BASE, ADAPTER).modules}
    wide = ddiscan.scan(prof, ADAPTER)
    for m in wide.modules:
        assert abs(m.deviation - exact[m.name]) <= abs(narrow[m.name] - exact[m.name]) + 1e-6
    p = Profile(prof)
    key = "model.layers.0.self_attn.q_proj.weight"
    basis = p.basis(key, transposed=False, t=16)
    assert np.allclose(basis.T @ basis, np.eye(16), atol=1e-5)
    assert np.array_equal(p.basis(key, transposed=False, t=3), basis[:, :3])
    with pytest.raises(ddiscan.InputError, match="up to t=16"):
        p.basis(key, transposed=False, t=17)


def test_profile_file_is_small_and_records_its_base(tmp_path):
    prof = tmp_path / "tiny.ddiprofile"
    result = _run("profile", BASE, "-o", prof, "--max-t", "8")
    assert result.exit_code == 0 and "14 weights" in result.output
    meta = json.loads(SafetensorsFile(prof).metadata["ddiscan.profile"])
    assert (meta["max_t"], meta["power_iters"], meta["oversample"], meta["seed"]) == (8, 4, 8, 0)
    assert sorted(f["name"] for f in meta["base_files"]) == sorted(p.name for p in BASE.glob("*.safetensors"))
    assert all(len(f["sha256"]) == 64 for f in meta["base_files"])
    assert "model.embed_tokens.weight" not in meta["weights"] and "lm_head.weight" not in meta["weights"]
    base_size = sum(p.stat().st_size for p in BASE.glob("*.safetensors"))
    assert prof.stat().st_size < 0.5 * base_size
    assert _run("profile", BASE, "-o", prof).exit_code == 2  # exists, no --force
    assert _run("profile", BASE, "-o", tmp_path / "x.safetensors").exit_code == 2  # wrong suffix


def test_check_exit_codes_and_messages(tmp_path):
    prof = tmp_path / "tiny.ddiprofile"
    build_profile(BASE, prof, max_t=4)
    ok = _run("check", "--base", prof, "--max-ddi", "0.05", ADAPTER)
    assert ok.exit_code == 0 and ok.stdout == "" and "all pass" in ok.stderr
    bad = _run("check", "--base", BASE, "--max-ddi", "0.02", ADAPTER / "adapter_config.json",
               ADAPTER / "adapter_model.safetensors")
    assert bad.exit_code == 1
    assert bad.stdout.splitlines() == [
        f"{ADAPTER / 'adapter_model.safetensors'}:1: model.layers.1.self_attn.v_proj: DDI 0.0365185 > 0.02"]
    norm = _run("check", "--base", BASE, "--max-ddi-norm", "0.009", ADAPTER)
    assert norm.exit_code == 1 and len(norm.stdout.splitlines()) == 2  # v_proj and k_proj of block 1
    js = _run("check", "--base", BASE, "--max-ddi", "0.02", "--format", "json", ADAPTER)
    assert js.exit_code == 1 and json.loads(js.stdout)["modules"][0]["ddi"] > 0.02
    assert _run("check", "--base", BASE, ADAPTER).exit_code == 2  # no limit given
    missing = CliRunner().invoke(cli, ["check", "--base", str(BASE), "--max-ddi", "1", str(tmp_path / "nope")])
    assert missing.exit_code == 3 and missing.stderr.startswith("Error: ")


def test_base_looked_up_from_adapter_config(tmp_path, monkeypatch):
    adapter = tmp_path / "lora"
    shutil.copytree(ADAPTER, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(BASE)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = _run("report", adapter, "--format", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["inputs"]["base"]["path"] == str(BASE)
    prof_dir = tmp_path / "profiles"
    prof_dir.mkdir()
    build_profile(BASE, prof_dir / "org--tiny.ddiprofile", max_t=4)
    config["base_model_name_or_path"] = "org/tiny"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    found = _run("check", "--profiles", prof_dir, "--max-ddi", "0.02", adapter)
    assert found.exit_code == 1 and "model.layers.1.self_attn.v_proj" in found.stdout
    lost = CliRunner().invoke(cli, ["check", "--max-ddi", "0.02", str(adapter)])
    assert lost.exit_code == 3 and "looked in" in lost.stderr and lost.stderr.count("\n") == 1


def test_many_adapters_read_each_base_tensor_once(tmp_path, monkeypatch):
    second = _second_adapter(tmp_path)
    singles = [ddiscan.scan(BASE, a) for a in (ADAPTER, second)]
    reads = []
    original = SafetensorsFile.mapped

    def counting(self, name):
        if "base_model" not in name:
            reads.append(name)
        return original(self, name)

    monkeypatch.setattr(SafetensorsFile, "mapped", counting)  # every read of a tensor maps it
    many = ddiscan.scan_many(BASE, [ADAPTER, second])
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 8
    assert [r.to_json() for r in many] == [r.to_json() for r in singles]


def test_report_cli_with_several_adapters(tmp_path):
    second = _second_adapter(tmp_path)
    table = _run("report", BASE, ADAPTER, second)
    assert table.exit_code == 0 and table.stdout.count("== ") == 2
    stream = _run("report", BASE, ADAPTER, second, "--format", "jsonl")
    rows = [json.loads(line) for line in stream.stdout.splitlines()]
    assert len(rows) == 16 and {r["adapter"] for r in rows} == {str(ADAPTER), str(second)}
    out = tmp_path / "reports"
    assert _run("report", BASE, ADAPTER, second, "-o", out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["lora-3.0.json", "tiny-lora.json"]
    assert _run("report", BASE, ADAPTER, second, "-o", tmp_path / "x.csv", "--format", "csv").exit_code == 2


def test_a_profile_of_a_non_finite_weight_marks_the_module_non_finite(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    w[3, 4] = np.inf
    save_file({"model.layers.0.self_attn.q_proj.weight": w,
               "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((16, 16)).astype(np.float32)},
              tmp_path / "base.safetensors")
    adapter = {}
    for name in ("q_proj", "k_proj"):
        stem = f"base_model.model.model.layers.0.self_attn.{name}"
        adapter[stem + ".lora_A.weight"] = rng.standard_normal((2, 16)).astype(np.float32)
        adapter[stem + ".lora_B.weight"] = rng.standard_normal((16, 2)).astype(np.float32)
    save_file(adapter, tmp_path / "a.safetensors")
    build_profile(tmp_path / "base.safetensors", tmp_path / "p.ddiprofile", max_t=2)
    via_profile = ddiscan.scan(tmp_path / "p.ddiprofile", tmp_path / "a.safetensors", scaling=1.0)
    via_base = ddiscan.scan(tmp_path / "base.safetensors", tmp_path / "a.safetensors", scaling=1.0)
    for report in (via_profile, via_base):
        finite = {m.name: m.finite for m in report.modules}
        assert finite == {"model.layers.0.self_attn.q_proj": False, "model.layers.0.self_attn.k_proj": True}
