"""ddiscan prune: selection, zero and drop rewriting, refusals, and PEFT loading the result."""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

import ddiscan
from ddiscan.cli import cli
from ddiscan.io import SafetensorsFile
from ddiscan.report import ModuleScore
from ddiscan.select import select

ROOT = Path(__file__).resolve().parents[1]
BASE, ADAPTER = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "tiny-lora"


def _digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _score(name, ddi, finite=True):
    return ModuleScore(name=name, base_key=name + ".weight", kind="q", block=0, layout="linear", d=2, k=2,
                       r=1, t=1, scale=1.0, scale_source="x", transposed=False, dora=False, finite=finite,
                       ddi=ddi if finite else None, ddi_norm=ddi / (1 + ddi) if finite else None)


def test_selection_rules_and_ties_by_name():
    mods = [_score("b", 0.5), _score("a", 0.5), _score("c", 0.1), _score("n", 0, finite=False)]
    assert select(mods, top=1).names == ["a"]
    assert select(mods, top=10).names == ["a", "b", "c"]
    assert select(mods, theta=0.5).names == ["a", "b"]
    assert select(mods, theta_norm=0.2).names == ["a", "b"]
    with pytest.raises(ddiscan.UsageError):
        select(mods, top=1, theta=0.1)


def test_zero_mode_zeroes_only_the_selected_modules(tmp_path):
    before = _digest(ADAPTER)
    out = tmp_path / "pruned"
    result = _run("prune", BASE, ADAPTER, "--top", "2", "-o", out, "--report-out", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert _digest(ADAPTER) == before
    src, dst = SafetensorsFile(ADAPTER / "adapter_model.safetensors"), SafetensorsFile(out / "adapter_model.safetensors")
    report = json.loads((tmp_path / "r.json").read_text())
    pruned = [m["name"] for m in report["modules"] if m["action"] == "pruned"]
    assert pruned == report["selection"]["pruned"] == [m["name"] for m in report["modules"][:2]]
    assert list(src.keys()) == list(dst.keys())
    for key in src.keys():
        assert src.tensors[key].dtype == dst.tensors[key].dtype and src.tensors[key].shape == dst.tensors[key].shape
        if any(key.startswith(f"base_model.model.{name}.") for name in pruned):
            assert not np.any(dst.array(key))
        else:
            assert src.raw_bytes(key) == dst.raw_bytes(key)
    meta = dst.metadata
    assert meta["format"] == "pt" and json.loads(meta["ddiscan.pruned"]) == sorted(pruned)
    assert meta["ddiscan.source_sha256"] == hashlib.sha256((ADAPTER / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert (out / "adapter_config.json").read_bytes() == (ADAPTER / "adapter_config.json").read_bytes()
    sel = report["selection"]
    assert sel["parameters_removed"] == sum(
        np.prod(src.tensors[k].shape) for k in src.keys() if any(f".{n}." in k for n in pruned))
    # the rewritten file is valid for the safetensors library too
    assert set(load_file(out / "adapter_model.safetensors")) == set(src.keys())


def test_drop_mode_from_report_without_base(tmp_path):
    report = tmp_path / "r.json"
    assert _run("report", BASE, ADAPTER, "-o", report).exit_code == 0
    out = tmp_path / "dropped"
    result = _run("prune", "--from-report", report, "--top", "3", "--mode", "drop", "-o", out)
    assert result.exit_code == 0, result.output
    pruned = [m["name"] for m in json.loads(report.read_text())["modules"][:3]]
    dst = SafetensorsFile(out / "adapter_model.safetensors")
    assert len(dst.tensors) == 16 - 6
    assert not any(f".{n}." in k for k in dst.keys() for n in pruned)
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["exclude_modules"]) == sorted(pruned)


def test_from_report_refuses_a_changed_adapter(tmp_path):
    adapter = tmp_path / "a"
    shutil.copytree(ADAPTER, adapter)
    report = tmp_path / "r.json"
    assert _run("report", BASE, adapter, "-o", report).exit_code == 0
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * 2
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    result = CliRunner().invoke(cli, ["prune", "--from-report", str(report), "--top", "1", "-o", str(tmp_path / "o")])
    assert result.exit_code == 3
    assert "different adapter" in result.stderr and "Traceback" not in result.output


def test_refusals(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    cases = [
        (["prune", BASE, ADAPTER, "--top", "1", "-o", out], 2, "exists"),
        (["prune", BASE, ADAPTER, "--top", "1", "-o", ADAPTER], 2, "is an input"),
        (["prune", BASE, ADAPTER, "--top", "1", "--theta", "0.1", "-o", tmp_path / "x"], 2, "exactly one"),
        (["prune", BASE, ADAPTER, "-o", tmp_path / "x"], 2, "exactly one"),
        (["prune", BASE, ADAPTER, "--top", "8", "--mode", "drop", "-o", tmp_path / "x"], 2, "every LoRA module"),
    ]
    link = tmp_path / "link"
    link.symlink_to(ADAPTER)
    cases.append((["prune", BASE, ADAPTER, "--top", "1", "-o", link], 2, "is an input"))
    for args, code, text in cases:
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == code, (args, result.output)
        assert text in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "o"]


def test_threshold_warnings_and_dry_run(tmp_path):
    result = _run("prune", BASE, ADAPTER, "--theta", "0.45", "--dry-run")
    assert result.exit_code == 0
    assert "selects no module" in result.stderr and "DDI ranges from" in result.stderr
    assert "dry run: nothing written" in result.stdout
    result = _run("prune", BASE, ADAPTER, "--theta-norm", "0", "--dry-run")
    assert "selects every module" in result.stderr
    assert not list(tmp_path.iterdir())


def test_prune_report_validates_against_the_schema(tmp_path):
    import jsonschema

    for extra in (["-o", tmp_path / "out"], ["--dry-run"]):
        report = tmp_path / "r.json"
        assert _run("prune", BASE, ADAPTER, "--top", "2", "--report-out", report, "--force", *extra).exit_code == 0
        data = json.loads(report.read_text())
        jsonschema.validate(data, ddiscan.load_schema())
        assert [m["action"] for m in data["modules"]] == ["pruned"] * 2 + ["kept"] * 6
    assert data["selection"]["dry_run"] is True and "parameters_removed" not in data["selection"]


def _kohya(tmp_path):
    import ml_dtypes

    rng = np.random.default_rng(3)
    names = ["down_blocks_0_attentions_0_proj_in", "down_blocks_0_attentions_0_proj_out", "mid_block_resnets_0_conv1"]
    base, adapter = {}, {}
    for i, name in enumerate(names):
        key = name.replace("_blocks_0_", "_blocks.0.").replace("attentions_0_", "attentions.0.").replace(
            "block_resnets_0_", "block.resnets.0.")
        if "conv" in name:
            base[key + ".weight"] = rng.standard_normal((8, 6, 3, 3)).astype(np.float32)
            down, up = rng.standard_normal((2, 6, 3, 3)), rng.standard_normal((8, 2, 1, 1))
        else:
            base[key + ".weight"] = rng.standard_normal((8, 6)).astype(np.float32)
            down, up = rng.standard_normal((2, 6)), rng.standard_normal((8, 2)) * (i + 1)
        adapter[f"lora_unet_{name}.lora_down.weight"] = down.astype(ml_dtypes.bfloat16)
        adapter[f"lora_unet_{name}.lora_up.weight"] = up.astype(ml_dtypes.bfloat16)
        adapter[f"lora_unet_{name}.alpha"] = np.array(1.0 + i, dtype=np.float16)
    save_file(base, tmp_path / "unet.safetensors")
    save_file(adapter, tmp_path / "lora.safetensors", metadata={"ss_network_dim": "2", "ss_network_alpha": "1"})
    return tmp_path / "unet.safetensors", tmp_path / "lora.safetensors"


@pytest.mark.parametrize("mode", ["zero", "drop"])
def test_kohya_round_trip_changes_only_the_pruned_module(tmp_path, mode):
    base, lora = _kohya(tmp_path)
    before = lora.read_bytes()
    out = tmp_path / "out.safetensors"
    result = _run("prune", base, lora, "--top", "1", "--mode", mode, "-o", out, "--report-out", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert lora.read_bytes() == before
    (name,) = json.loads((tmp_path / "r.json").read_text())["selection"]["pruned"]
    src, dst = SafetensorsFile(lora), SafetensorsFile(out)
    mine = {k for k in src.keys() if k.startswith(name + ".")}
    assert len(mine) == 3
    assert dst.metadata["ss_network_dim"] == "2" and dst.metadata["ddiscan.mode"] == mode
    expected_keys = list(src.keys()) if mode == "zero" else [k for k in src.keys() if k not in mine]
    assert list(dst.keys()) == expected_keys
    for key in dst.keys():
        assert (dst.tensors[key].dtype, dst.tensors[key].shape) == (src.tensors[key].dtype, src.tensors[key].shape)
        if key in mine and not key.endswith(".alpha"):
            assert not np.any(dst.array(key).astype(np.float32))
        else:
            assert dst.raw_bytes(key) == src.raw_bytes(key), key
    # what is left scores as before; the pruned module, if kept, has ΔW = 0
    rescan = ddiscan.scan(base, out)
    for m in rescan.modules:
        assert (m.ddi == 0) == (m.name == name)


def test_top_that_selects_every_module_warns_as_theta_does(tmp_path):
    for top in ("8", "10"):
        result = _run("prune", BASE, ADAPTER, "--top", top, "--dry-run")
        assert result.exit_code == 0, result.output
        assert f"warning: top {top} by DDI selects every module; DDI ranges from" in result.stderr
        assert "selected 8 of 8 modules" in result.stdout
    result = _run("prune", BASE, ADAPTER, "--top", "7", "--dry-run")
    assert result.exit_code == 0 and "warning" not in result.stderr
    result = _run("prune", BASE, ADAPTER, "--top", "0", "--dry-run")
    assert result.exit_code == 0 and "warning" not in result.stderr


def test_drop_refuses_a_base_layer_beside_a_weight_of_the_same_module(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {}
    for name in ("embed_tokens", "layers.0.q_proj"):
        stem = f"base_model.model.model.{name}"
        tensors[f"{stem}.lora_A.weight"] = rng.standard_normal((2, 4)).astype(np.float32)
        tensors[f"{stem}.lora_B.weight"] = rng.standard_normal((4, 2)).astype(np.float32)
    wrapped = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[wrapped] = tensors["base_model.model.model.embed_tokens.weight"] = np.ones((4, 4), np.float32)
    save_file(tensors, tmp_path / "lora.safetensors")
    adapter = ddiscan.lora.load_adapter(tmp_path / "lora.safetensors")
    with pytest.raises(ddiscan.InputError, match="embed_tokens.base_layer.weight and .*embed_tokens.weight"):
        ddiscan.rewrite.rewrite_adapter(adapter, ["model.embed_tokens"], tmp_path / "out.safetensors", mode="drop")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("args,needle", [
    (["--top", "1", "--theta", "0.1", "-o", "x"], "exactly one"),
    (["-o", "x"], "exactly one"),
    (["--theta-norm", "0.1", "--method", "safelora", "--aligned", "a", "--unaligned", "u", "-o", "x"], "--theta-norm"),
    (["--top", "1"], "-o/--output"),
])
def test_bad_selection_options_fail_before_the_scan(tmp_path, monkeypatch, args, needle):
    monkeypatch.setattr(sys.modules["ddiscan.prune"], "scan", lambda *a, **k: pytest.fail("scanned before checking the options"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["prune", str(BASE), str(ADAPTER), *args])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_refusals_name_the_parameters(tmp_path):
    with pytest.raises(ddiscan.options.OptionError) as info:
        ddiscan.prune(None, ADAPTER, tmp_path / "out", top=1)
    assert str(info.value) == "give base, or from_report"
    assert info.value.render({"base": "BASE", "from_report": "--from-report"}) == "give BASE, or --from-report"
    with pytest.raises(ddiscan.options.OptionError) as info:
        ddiscan.prune(BASE, ADAPTER, tmp_path / "out", top=1, mode="project")
    assert str(info.value) == "mode project needs base, aligned and unaligned"
    assert list(tmp_path.iterdir()) == []
