"""Hostile JSON and numbers (issue #14, items 1, 10, 11, 12): every case exits with the exact
code and one ``Error:`` line, leaves its inputs byte-identical, never hangs, never prints a
traceback, and never lets a secret of the environment out.

The adapter is the PEFT-written fixture (fixtures/tiny-lora, fixtures/make_fixtures.py),
copied and then edited the way a stranger would edit it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from click.testing import CliRunner

from ddiscan.cli import cli
from ddiscan.errors import InputError
from ddiscan.io import jsonfile
from ddiscan.io.reader import MAX_HEADER_SIZE

from safetensors_builders import raw_safetensors

try:
    RUNNER = CliRunner(mix_stderr=False)
except TypeError:
    RUNNER = CliRunner()

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
SECRET = "s3cr3t-token-0b5e7c1d"
DEEP = "[" * 100_000 + "]" * 100_000
BIG_INT = "7" * 5000


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.delenv("DDISCAN_DEBUG", raising=False)
    monkeypatch.setenv("DDI_SECRET", SECRET)


@pytest.fixture
def pair(tmp_path):
    base, adapter = tmp_path / "tiny-llama", tmp_path / "tiny-lora"
    shutil.copytree(FIXTURES / "tiny-llama", base)
    shutil.copytree(FIXTURES / "tiny-lora", adapter)
    return base, adapter


def snapshot(root: Path) -> dict:
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                state[str(path)] = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                state[str(path)] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                state[str(path)] = ("other", stat.S_IFMT(st.st_mode))
    return state


def invoke(args, root: Path, code: int, needle: str | None = None):
    """Run ddiscan in-process; assert the exit code, one Error line, no traceback, inputs unchanged."""
    before = snapshot(root)
    result = RUNNER.invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    out = result.stdout + result.stderr
    assert "Traceback" not in out
    assert result.exit_code == code, (result.exit_code, out)
    if code:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), lines
        if needle is not None:
            assert needle in lines[0], lines[0]
    assert SECRET not in out
    assert snapshot(root) == before
    return result


def edit_config(adapter: Path, **fields) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------
# 12. adapter_config.json fields: type and range, by name


@pytest.mark.parametrize("field, value, needle", [
    ("r", 4.9, "'r' must be a positive integer, not 4.9"),
    ("r", "4", "'r' must be a positive integer"),
    ("r", True, "'r' must be a positive integer, not True"),
    ("r", None, "'r' must be a positive integer, not None"),
    ("r", -4, "'r' must be a positive integer"),
    ("lora_alpha", "8", "'lora_alpha' must be a number"),
    ("lora_alpha", False, "'lora_alpha' must be a number"),
    ("use_rslora", "yes", "'use_rslora' must be true or false"),
    ("fan_in_fan_out", 1, "'fan_in_fan_out' must be true or false"),
    ("rank_pattern", {"q_proj": "8"}, "'rank_pattern' must be an object of positive integers"),
    ("rank_pattern", [1], "'rank_pattern' must be an object"),
    ("alpha_pattern", {"q_proj": None}, "'alpha_pattern' must be an object of numbers"),
    ("target_modules", 3, "'target_modules' must be a string or a list of strings"),
    ("exclude_modules", [["q_proj"]], "'exclude_modules' must be a string or a list of strings"),
    ("base_model_name_or_path", 7, "'base_model_name_or_path' must be a string"),
    ("peft_type", ["LORA"], "'peft_type' must be a string"),
])
def test_config_field_of_the_wrong_type_is_named(pair, field, value, needle):
    base, adapter = pair
    edit_config(adapter, **{field: value})
    invoke(["report", base, adapter], base.parent, 3, needle)


@pytest.mark.parametrize("alpha", [1e200, 1e300])
def test_huge_lora_alpha_gives_finite_scores(pair, alpha):
    base, adapter = pair
    edit_config(adapter, lora_alpha=alpha)
    result = invoke(["report", base, adapter, "--format", "json"], base.parent, 0)
    data = json.loads(result.stdout)
    assert data["modules"] and all(m["finite"] and math.isfinite(m["ddi"]) for m in data["modules"])
    # DDI is s-dependent only through M_norm, which saturates: the scores are those of a huge update
    assert all(m["magnitude_norm"] == pytest.approx(1.0, abs=1e-9) for m in data["modules"])


def test_alpha_option_1e308_gives_finite_scores(pair):
    base, adapter = pair
    result = invoke(["report", base, adapter, "--alpha", "1e308", "--format", "json"], base.parent, 0)
    assert all(m["finite"] and math.isfinite(m["deviation"]) for m in json.loads(result.stdout)["modules"])


def _rewrite_factors(adapter: Path, fn) -> None:
    path = adapter / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(str(path))
    safetensors.numpy.save_file({k: fn(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def test_float64_factors_of_1e150_give_finite_scores_equal_to_moderate_ones(pair, tmp_path):
    # S and O do not depend on the size of ΔW once ε (1e-6) is negligible: factors of 1e3
    # (‖ΔW‖ far above ε) and of 1e150 (‖ΔW‖² far beyond float64) give the same S and O
    base, adapter = pair
    _rewrite_factors(adapter, lambda v: v.astype(np.float64) * 1e3)
    plain = invoke(["report", base, adapter, "--format", "json"], base.parent, 0)
    _rewrite_factors(adapter, lambda v: v * 1e147)
    big = invoke(["report", base, adapter, "--format", "json"], base.parent, 0)
    small, large = json.loads(plain.stdout)["modules"], json.loads(big.stdout)["modules"]
    for a, b in zip(sorted(small, key=lambda m: m["name"]), sorted(large, key=lambda m: m["name"])):
        assert b["finite"] and math.isfinite(b["delta_norm"])
        assert b["sharpness"] == pytest.approx(a["sharpness"], rel=1e-6, abs=1e-9)
        assert b["deviation"] == pytest.approx(a["deviation"], rel=1e-6, abs=1e-9)
        assert b["delta_norm"] == pytest.approx(a["delta_norm"] * 1e294, rel=1e-5)


def test_float64_factors_of_1e160_are_a_clear_error(pair):
    base, adapter = pair
    _rewrite_factors(adapter, lambda v: v.astype(np.float64) * 1e160)
    invoke(["report", base, adapter], base.parent, 3, "exceeds the float64 range")


@pytest.mark.parametrize("dtype, name", [(np.int8, "I8"), (np.bool_, "BOOL")])
def test_integer_and_boolean_factors_are_refused_by_dtype(pair, dtype, name):
    base, adapter = pair
    _rewrite_factors(adapter, lambda v: (v * 10).astype(dtype))
    invoke(["report", base, adapter], base.parent, 3, f"has dtype {name}; LoRA factors must be floating point")


# ---------------------------------------------------------------------------------------
# 11. JSON bombs, in every JSON reader


@pytest.mark.parametrize("text, needle", [
    (DEEP, "nested 100000 deep, more than 64"),
    ('{"r": ' + BIG_INT + "}", "an integer of 5000 digits"),
    ('{"x": ' + "[" * 65 + "]" * 65 + "}", "nested 66 deep"),
    ("{\"r\": 4, \"lora_alpha\": 8, \"x\": \"" + "[" * 1000 + "\"}", None),  # brackets in a string do not count
])
def test_json_bombs_in_adapter_config(pair, text, needle):
    base, adapter = pair
    (adapter / "adapter_config.json").write_text(text)
    if needle is None:  # the config parses; the adapter is scored
        invoke(["report", base, adapter], base.parent, 0)
    else:
        invoke(["report", base, adapter], base.parent, 3, needle)


@pytest.mark.parametrize("text, needle", [
    (DEEP, "nested 100000 deep"),
    ('{"metadata": {"total_size": ' + BIG_INT + '}, "weight_map": {}}', "5000 digits"),
    ('{"weight_map": {"a": NaN}}', "NaN (not a JSON number)"),
    ('{"weight_map": {"a": 1e999}}', "beyond the float64 range"),
])
def test_json_bombs_in_the_checkpoint_index(pair, text, needle):
    base, adapter = pair
    (base / "model.safetensors.index.json").write_text(text)
    invoke(["report", base, adapter], base.parent, 3, needle)


def test_json_bomb_in_a_safetensors_header(pair):
    base, adapter = pair
    raw_safetensors(adapter / "adapter_model.safetensors", '{"a": ' + DEEP + "}")
    invoke(["report", base, adapter], base.parent, 3, "nested 100001 deep, more than 64")


def test_json_bomb_in_diffusers_metadata(pair, tmp_path):
    base, adapter = pair
    tensors = safetensors.numpy.load_file(str(adapter / "adapter_model.safetensors"))
    single = tmp_path / "lora.safetensors"
    safetensors.numpy.save_file(tensors, str(single), metadata={"lora_adapter_metadata": DEEP})
    invoke(["report", base, single], tmp_path, 3, "lora_adapter_metadata")


def test_json_bomb_in_profile_metadata(pair, tmp_path):
    base, adapter = pair
    profile = tmp_path / "tiny.ddiprofile"
    invoke(["profile", base, "-o", profile], base, 0)
    tensors = safetensors.numpy.load_file(str(profile))
    safetensors.numpy.save_file(tensors, str(profile), metadata={"ddiscan.profile": DEEP, "format": "ddiscan-profile"})
    invoke(["report", profile, adapter], tmp_path, 3, "nested 100000 deep")


@pytest.mark.parametrize("text, needle", [
    (DEEP, "nested 100000 deep"),
    ('{"inputs": {"adapter": {"path": "x", "size": ' + BIG_INT + "}}}", "5000 digits"),
    ('{"inputs": {"adapter": {"path": "x", "size": Infinity}}}', "Infinity (not a JSON number)"),
])
def test_json_bombs_in_a_report_given_to_prune(pair, tmp_path, text, needle):
    report = tmp_path / "report.json"
    report.write_text(text)
    invoke(["prune", "--from-report", report, "--top", "1", "-o", tmp_path / "out"], tmp_path, 3, needle)
    assert not (tmp_path / "out").exists()


def test_parse_json_bounds_and_one_line_errors():
    assert jsonfile.MAX_JSON_SIZE == MAX_HEADER_SIZE
    assert jsonfile.parse_json('{"a": [1, 2.5, "[[["]}', "x", "src") == {"a": [1, 2.5, "[[["]}
    assert jsonfile.parse_json("[" * 64 + "]" * 64, "x", "src") is not None
    assert math.isnan(jsonfile.parse_json('{"a": NaN}', "x", "src", non_finite=True)["a"])
    for text in ["[" * 65 + "]" * 65, BIG_INT, "NaN", "-Infinity", "1e400", b"\xff", "{", "", '"\\ud800', 3]:
        with pytest.raises(InputError) as info:
            jsonfile.parse_json(text, "x", "src")
        assert str(info.value).startswith("src: not valid JSON (") and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------
# 10. special files as JSON: refused before any read, no hang, no unbounded memory


def _run(args, timeout=60, env=None):
    return subprocess.run([sys.executable, "-m", "ddiscan.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
@pytest.mark.parametrize("target", ["adapter_config.json", "model.safetensors.index.json", "report.json"])
def test_special_file_as_json_is_refused_without_a_hang(pair, tmp_path, special, target):
    base, adapter = pair
    folder = {"adapter_config.json": adapter, "model.safetensors.index.json": base, "report.json": tmp_path}[target]
    path = folder / target
    path.unlink(missing_ok=True)
    if special == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(special)
    args = (["prune", "--from-report", path, "--top", "1", "-o", tmp_path / "out"] if target == "report.json"
            else ["report", base, adapter])
    before = snapshot(tmp_path)
    result = _run(args)  # a hang is a TimeoutExpired failure
    assert result.returncode == 3, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "is not a regular file" in lines[0], lines
    assert snapshot(tmp_path) == before


def test_oversized_json_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "adapter_config.json"
    with open(path, "wb") as f:
        f.truncate(jsonfile.MAX_JSON_SIZE + 1)  # sparse: nothing is read
    with pytest.raises(InputError, match=r"is 100000001 bytes, more than 100000000"):
        jsonfile.read_json(path, "adapter_config.json")


# ---------------------------------------------------------------------------------------
# 1. no secret leaves through a message


NAMES = ["x-${DDI_SECRET}", "${DDI_SECRET}", "$DDI_SECRET", "~/${DDI_SECRET}/model", "${DDI_SECRET}\n\x1b[31mforged"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("command", ["report", "check", "prune"])
def test_secret_in_the_environment_never_leaves(pair, tmp_path, monkeypatch, name, command):
    base, adapter = pair
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DDISCAN_PROFILES", raising=False)
    # a directory named by the secret exists: expanding the name would find it
    (tmp_path / f"x-{SECRET}").mkdir()
    (tmp_path / "home" / SECRET / "model").mkdir(parents=True)
    edit_config(adapter, base_model_name_or_path=name)
    monkeypatch.chdir(tmp_path)
    # prune needs BASE (it never looks for one): the name is carried into the pruned config as is
    out = tmp_path.parent / (tmp_path.name + "-out")
    args = {"report": ["report", adapter], "check": ["check", adapter, "--max-ddi", "1"],
            "prune": ["prune", base, adapter, "--top", "1", "-o", out]}[command]
    code = 0 if command == "prune" else 3
    result = invoke(args, tmp_path, code, "no base found for")
    assert "\x1b" not in result.stderr
    if command == "prune":
        assert not [p for p in out.iterdir() if SECRET.encode() in p.read_bytes()]
        shutil.rmtree(out)
    sub = _run(args, env={"HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "cache")})
    assert sub.returncode == code and SECRET not in sub.stdout + sub.stderr, sub.stderr
    assert len(sub.stderr.splitlines()) == (1 if code else len(sub.stderr.splitlines()))


def test_a_config_naming_etc_lists_nothing_and_echoes_no_bytes(pair, tmp_path):
    base, adapter = pair
    head = struct.unpack("<Q", Path("/etc/passwd").read_bytes()[:8])[0]
    listing = sorted(os.listdir("/etc"))[:4]
    for name in ("/etc", "/etc/passwd"):
        edit_config(adapter, base_model_name_or_path=name)
        result = invoke(["report", adapter], tmp_path, 3, "no base found for")
        assert str(head) not in result.stderr
        assert not any(f" {entry}," in result.stderr or f"only {entry}" in result.stderr for entry in listing)
