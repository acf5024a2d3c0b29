"""Issue #14, part C: the gate cannot be switched off, names cannot forge output, no hang,
no unbounded allocation, and every failure is the documented one-line error.

Each case asserts the exact exit code, the exact one line on stderr, and that every input
file is byte-for-byte unchanged afterwards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

import ddiscan.cli
from ddiscan.cli import cli
from ddiscan.io.reader import SafetensorsFile
from ddiscan.io.writer import SafetensorsEntry
from ddiscan.profile import DIGEST_KEY, META_KEY, Profile, _write_profile, build_profile

from safetensors_builders import llama_base_tensors, llama_peft_tensors, peft_config, write_llama_pair, write_peft_dir

ROOT = Path(__file__).resolve().parents[1]
BASE, ADAPTER = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "tiny-lora"
FAILING = "model.layers.1.self_attn.v_proj"  # the fixture's planted module: DDI 0.0365 > 0.02

try:
    RUNNER = CliRunner(mix_stderr=False)
except TypeError:  # click 8.2+ always keeps stderr apart
    RUNNER = CliRunner()


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("DDISCAN_DEBUG", raising=False)


def run(*args):
    return RUNNER.invoke(cli, [str(a) for a in args])


def snapshot(*roots) -> dict:
    state = {}
    for root in roots:
        root = Path(root)
        for path in sorted([root] if root.is_file() else root.rglob("*")):
            if path.is_file():
                state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def assert_error(result, code: int, message: str):
    """Exit ``code``, nothing on stdout, and exactly ``Error: message`` on stderr."""
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    assert result.stderr == f"Error: {message}\n"
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


@pytest.fixture
def pair(tmp_path):
    return write_llama_pair(tmp_path / "in", layers=1)


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "tiny.ddiprofile"
    build_profile(BASE, path, max_t=4)
    return path


# ---------------------------------------------------------------------------------------
# 3. The gate cannot be switched off by options


LIMITS = ["--max-ddi", "--max-ddi-norm"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e400"])
@pytest.mark.parametrize("flag", LIMITS)
def test_a_non_finite_ddi_limit_is_a_usage_error(flag, value):
    before = snapshot(BASE, ADAPTER)
    result = run("check", "--base", BASE, flag, value, ADAPTER)
    assert_error(result, 2, f"Invalid value for '{flag}': {value!r} is not a finite number")
    assert snapshot(BASE, ADAPTER) == before


@pytest.mark.parametrize("flag,method", [("--min-cosine", "safelora"), ("--max-ediem", "splora")])
def test_a_non_finite_limit_of_the_other_methods_is_a_usage_error(flag, method):
    result = run("check", "--base", BASE, "--method", method, "--aligned", BASE, "--unaligned", BASE, flag, "nan",
                 ADAPTER)
    assert_error(result, 2, f"Invalid value for '{flag}': 'nan' is not a finite number")


@pytest.mark.parametrize("command,flag", [("prune", "--theta"), ("prune", "--theta-norm"), ("report", "--alpha"),
                                          ("report", "--scaling"), ("report", "--t-mult"), ("check", "--t-mult")])
def test_every_float_option_is_finite(command, flag):
    args = {"prune": ["prune", BASE, ADAPTER, "--dry-run"], "report": ["report", BASE, ADAPTER],
            "check": ["check", "--base", BASE, "--max-ddi", "1", ADAPTER]}[command]
    result = run(*args, flag, "inf")
    assert_error(result, 2, f"Invalid value for '{flag}': 'inf' is not a finite number")


def test_the_nan_limit_no_longer_passes_a_failing_adapter():
    result = run("check", "--base", BASE, "--max-ddi", "0.02", ADAPTER)
    assert result.exit_code == 1
    assert result.stdout == f"{ADAPTER / 'adapter_model.safetensors'}:1: {FAILING}: DDI 0.0365185 > 0.02\n"


@pytest.mark.parametrize("args,message", [
    (["--seed", "-1"], "Invalid value for '--seed': -1 is not in the range x>=0."),
    (["--threads", "1e30"], "Invalid value for '--threads': '1e30' is not a valid integer range."),
    (["--threads", str(10**30)], f"Invalid value for '--threads': {10**30} is not in the range 1<=x<=4096."),
])
def test_integer_options_are_bounded(args, message):
    result = run("report", BASE, ADAPTER, *args)
    assert_error(result, 2, message)


# ---------------------------------------------------------------------------------------
# 3. ... nor by a profile


def _forge(source: Path, target: Path, *, meta=None, tensors=None, drop_digest=False, digest=True) -> Path:
    """A copy of the profile ``source`` with its metadata (``meta(dict)``) or tensors
    (``tensors(dict)``) changed, its digest recomputed as an attacker can (or kept stale
    with ``digest=False``, or dropped)."""
    file = SafetensorsFile(source)
    metadata = dict(file.metadata)
    data = load_file(source)
    if meta is not None:
        parsed = json.loads(metadata[META_KEY])
        meta(parsed)
        metadata[META_KEY] = json.dumps(parsed, sort_keys=True)
    if tensors is not None:
        tensors(data)
    stale = metadata.pop(DIGEST_KEY)
    if drop_digest or not digest:
        if not drop_digest:
            metadata[DIGEST_KEY] = stale
        save_file(data, target, metadata=metadata)
        return target
    entries = [SafetensorsEntry(name, {"float32": "F32", "float64": "F64", "int64": "I64"}[str(a.dtype)], a.shape, a.nbytes,
                                lambda a=a: iter([np.ascontiguousarray(a).tobytes()])) for name, a in data.items()]
    _write_profile(target, entries, metadata, force=True)
    return target


NORM = f"{FAILING}.weight:norm"


def _inflate(data):
    data[NORM] = data[NORM] * 1e6


def test_a_profile_with_inflated_norms_and_a_stale_digest_is_refused(profile, tmp_path):
    forged = _forge(profile, tmp_path / "forged.ddiprofile", tensors=_inflate, digest=False)
    before = snapshot(forged, ADAPTER)
    result = run("check", "--base", forged, "--max-ddi", "0.02", ADAPTER)
    assert_error(result, 3, f"{forged}: the profile's content does not match its sha256 digest (modified or "
                            "corrupt); rebuild it with 'ddiscan profile'")
    assert snapshot(forged, ADAPTER) == before


def test_a_profile_with_a_flipped_byte_is_refused(profile, tmp_path):
    forged = tmp_path / "flipped.ddiprofile"
    raw = bytearray(profile.read_bytes())
    raw[-3] ^= 1
    forged.write_bytes(bytes(raw))
    result = run("report", forged, ADAPTER)
    assert_error(result, 3, f"{forged}: the profile's content does not match its sha256 digest (modified or "
                            "corrupt); rebuild it with 'ddiscan profile'")


def test_a_profile_without_a_digest_is_refused(profile, tmp_path):
    old = _forge(profile, tmp_path / "old.ddiprofile", drop_digest=True)
    result = run("check", "--base", old, "--max-ddi", "0.02", ADAPTER)
    assert_error(result, 3, f"{old}: a profile without a content digest (written before ddiscan recorded one); "
                            "rebuild it with 'ddiscan profile'")


def test_check_names_the_profile_and_the_base_it_vouches_for(profile):
    result = run("check", "--base", profile, "--max-ddi", "0.02", ADAPTER)
    assert result.exit_code == 1
    digest = Profile(profile).sha256
    files = json.loads(SafetensorsFile(profile).metadata[META_KEY])["base_files"]
    assert [f["name"] for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    vouched = ", ".join(f"{f['name']} (sha256 {f['sha256']})" for f in files)
    assert result.stderr.splitlines()[0] == f"note: {profile}: profile sha256 {digest}, made from {vouched}"
    for f in files:  # the sha256 it vouches for is the base's
        assert f["sha256"] == hashlib.sha256((BASE / f["name"]).read_bytes()).hexdigest()


def test_a_pinned_digest_refuses_a_recomputed_forgery(profile, tmp_path):
    pin = Profile(profile).sha256
    assert len(pin) == 64
    forged = _forge(profile, tmp_path / "forged.ddiprofile", tensors=_inflate)
    unpinned = run("check", "--base", forged, "--max-ddi", "0.02", ADAPTER)
    assert unpinned.exit_code == 0  # an attacker who recomputes the digest switches the gate off ...
    result = run("check", "--base", forged, "--max-ddi", "0.02", "--profile-sha256", pin, ADAPTER)
    forged_digest = Profile(forged).sha256
    assert_error(result, 3, f"{forged}: profile sha256 {forged_digest} is not the pinned {pin}")  # ... unless pinned
    ok = run("check", "--base", profile, "--max-ddi", "0.02", "--profile-sha256", pin.upper(), ADAPTER)
    assert ok.exit_code == 1 and FAILING in ok.stdout
    report = run("report", profile, ADAPTER, "--profile-sha256", pin, "--format", "json")
    assert report.exit_code == 0 and json.loads(report.stdout)["inputs"]["base"]["profile"]["sha256"] == pin


@pytest.mark.parametrize("args,message", [
    (["--profile-sha256", "abc"], "Invalid value for '--profile-sha256': must be 64 hexadecimal digits (a sha256)"),
    (["--profile-sha256", "0" * 64], "--profile-sha256 pins a base profile; {base} is not a .ddiprofile file"),
])
def test_a_bad_pin_is_a_usage_error(args, message):
    result = run("check", "--base", BASE, "--max-ddi", "1", *args, ADAPTER)
    assert_error(result, 2, message.format(base=BASE))


def _set(field, value):
    def change(meta):
        meta[field] = value
    return change


def _weight(change):
    def apply(meta):
        change(meta["weights"][FAILING + ".weight"])
    return apply


def _drop(name):
    def apply(data):
        del data[name]
    return apply


def _replace(name, value):
    def apply(data):
        data[name] = value
    return apply


RITZ, RESIDUALS, INFO = (f"{FAILING}.weight:{name}" for name in ("ritz", "residuals", "ritz_info"))


def _change(name, change):
    def apply(data):
        data[name] = change(data[name])
    return apply


BAD_FIELD = "{path}: profile field {field!r} is missing or malformed; rebuild the profile"
BAD_TENSOR = "{path}: profile tensor {name!r} is missing or not {what}; rebuild the profile"


@pytest.mark.parametrize("meta,tensors,message", [
    (_set("max_t", "abc"), None, BAD_FIELD.format(path="{path}", field="max_t")),
    (_set("max_t", 0), None, BAD_FIELD.format(path="{path}", field="max_t")),
    (_set("max_t", True), None, BAD_FIELD.format(path="{path}", field="max_t")),
    (_set("seed", -1), None, BAD_FIELD.format(path="{path}", field="seed")),
    (_set("exact", "no"), None, BAD_FIELD.format(path="{path}", field="exact")),
    (_set("version", 99), None, BAD_FIELD.format(path="{path}", field="version")),
    (_set("weights", []), None, BAD_FIELD.format(path="{path}", field="weights")),
    (_set("base_files", [None]), None, BAD_FIELD.format(path="{path}", field="base_files")),
    (_weight(lambda w: w.pop("shape")), None, BAD_FIELD.format(path="{path}", field=f"weights.{FAILING}.weight")),
    (_weight(lambda w: w.update(shape=[0, 64])), None, BAD_FIELD.format(path="{path}", field=f"weights.{FAILING}.weight")),
    (_weight(lambda w: w.update(dtype="I8")), None, BAD_FIELD.format(path="{path}", field=f"weights.{FAILING}.weight")),
    (_weight(lambda w: w.update(shape=[64, 64])), None,
     BAD_TENSOR.format(path="{path}", name=f"{FAILING}.weight:left", what="F32 [64, 4]")),
    (None, _drop(NORM), BAD_TENSOR.format(path="{path}", name=NORM, what="F64 [1]")),
    (None, _replace(NORM, np.zeros(0)), BAD_TENSOR.format(path="{path}", name=NORM, what="F64 [1]")),
    (None, _replace(f"{FAILING}.weight:left", np.zeros((32, 2), np.float32)),
     BAD_TENSOR.format(path="{path}", name=f"{FAILING}.weight:left", what="F32 [32, 4]")),
    (None, _replace(NORM, np.array([-1.0])), f"{{path}}: {NORM} is -1, a norm cannot be negative"),
    # the Ritz values of the error bar (the fixture's v_proj is 32 × 64, stored with t = 4)
    (None, _drop(RITZ), BAD_TENSOR.format(path="{path}", name=RITZ, what="F64 [6]")),
    (None, _replace(RITZ, np.ones(5)), BAD_TENSOR.format(path="{path}", name=RITZ, what="F64 [6]")),
    (None, _replace(INFO, np.array([8.0, 0.0, 0.0])), BAD_TENSOR.format(path="{path}", name=INFO, what="I64 [3]")),
    (None, _replace(RESIDUALS, np.zeros(4, np.float32)),
     BAD_TENSOR.format(path="{path}", name=RESIDUALS, what="F64 [4]")),
    *[(None, _change(name, change), BAD_FIELD.format(path="{path}", field=name)) for name, change in [
        (RITZ, lambda a: np.where(np.arange(6) == 2, np.nan, a)),  # not finite
        (RITZ, lambda a: a[::-1].copy()),  # increasing
        (RITZ, lambda a: -a),  # negative
        (RITZ, lambda a: np.where(np.arange(6) == 5, np.inf, a)),
        (RITZ, lambda a: np.where(np.arange(6) == 1, a[0] * (1 + 1e-12), a)),  # θ_2 > θ_1, by a hair
        (RITZ, lambda a: np.array([1e308] * 4 + [1e-308, 0.0])),  # a gap θ_4 / θ_5 that overflows
        (RESIDUALS, lambda a: np.where(np.arange(4) == 0, -1.0, a)),
        (RESIDUALS, lambda a: np.where(np.arange(4) == 3, np.inf, a)),
        (INFO, lambda a: np.array([3, a[1], a[2]])),  # m < t
        (INFO, lambda a: np.array([33, a[1], a[2]])),  # m > min(d, k)
        (INFO, lambda a: np.array([12, 1, a[2]])),  # complete with m < min(d, k)
        (INFO, lambda a: np.array([a[0], 2, a[2]])),
        (INFO, lambda a: np.array([a[0], a[1], 2])),  # a side neither left nor right
        (INFO, lambda a: np.array([a[0], a[1], -1])),
    ]],
])
def test_a_tampered_profile_field_is_a_one_line_error(profile, tmp_path, meta, tensors, message):
    forged = _forge(profile, tmp_path / "forged.ddiprofile", meta=meta, tensors=tensors)
    before = snapshot(forged, ADAPTER)
    result = run("check", "--base", forged, "--max-ddi", "0.02", ADAPTER)
    assert_error(result, 3, message.format(path=forged))
    assert snapshot(forged, ADAPTER) == before


# ---------------------------------------------------------------------------------------
# 4. Names cannot forge output

EVIL = "x: DDI 0 > 1\nError: forged\x1b[2J\u2028"
SHOWN = "x: DDI 0 > 1\\nError: forged\\x1b[2J\\u2028"


@pytest.fixture
def evil(tmp_path):
    """A PEFT adapter whose q_proj module is named EVIL.model.layers.0.self_attn.q_proj
    (matched to the base's q_proj through the prefix rule)."""
    base, _ = write_llama_pair(tmp_path / "in", layers=1)
    tensors = {k.replace("base_model.model.model.layers.0.self_attn.q_proj",
                         f"base_model.model.{EVIL}.model.layers.0.self_attn.q_proj"): v
               for k, v in llama_peft_tensors(1).items()}
    adapter = write_peft_dir(tmp_path / "evil", tensors, peft_config(4, 8))
    return base, adapter


def _no_control(text: str):
    assert not any(c in text for c in "\x1b\u2028\r"), text


def test_a_module_name_cannot_forge_check_lines(evil):
    base, adapter = evil
    before = snapshot(base, adapter)
    result = run("check", "--base", base, "--max-ddi", "0", adapter)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 4  # one per module, no more
    assert sum(f":1: {SHOWN}.model.layers.0.self_attn.q_proj: DDI " in line for line in lines) == 1
    assert not any(line.startswith("Error") for line in lines)
    _no_control(result.stdout + result.stderr)
    assert result.stderr == "ddiscan check: 1 adapter(s), 4 modules: 4 failing\n"
    assert snapshot(base, adapter) == before


@pytest.mark.parametrize("fmt", ["table", "markdown", "csv"])
def test_a_module_name_is_escaped_in_every_text_format(evil, fmt):
    base, adapter = evil
    result = run("report", base, adapter, "--format", fmt)
    assert result.exit_code == 0, result.stderr
    _no_control(result.stdout)
    assert f"{SHOWN}.model.layers.0.self_attn.q_proj" in result.stdout
    rows = {"table": 1 + 4 + 1, "markdown": 2 + 4, "csv": 1 + 4}[fmt]
    assert len(result.stdout.splitlines()) == rows


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_json_keeps_the_name_exact(evil, fmt):
    base, adapter = evil
    result = run("report", base, adapter, "--format", fmt)
    assert result.exit_code == 0
    rows = (json.loads(result.stdout)["modules"] if fmt == "json"
            else [json.loads(line) for line in result.stdout.splitlines()])
    assert f"{EVIL}.model.layers.0.self_attn.q_proj" in {r["name"] for r in rows}


def test_a_module_name_cannot_forge_error_or_warning_lines(evil, tmp_path):
    _, adapter = evil
    other = write_llama_pair(tmp_path / "other", layers=1,
                             base_tensors={k: v for k, v in llama_base_tensors(1).items() if "q_proj" not in k})[0]
    key = f"base_model.model.{EVIL}.model.layers.0.self_attn.q_proj.lora_A.weight"
    shown = f"base_model.model.{SHOWN}.model.layers.0.self_attn.q_proj.lora_A.weight"
    result = run("report", other, adapter)
    assert key  # the raw key holds a newline; the line shows it escaped
    assert_error(result, 3, f"1 LoRA module(s) match no base weight in {other}: {shown}")
    warned = run("report", other, adapter, "--allow-unmatched")
    assert warned.exit_code == 0
    assert f"warning: 1 LoRA module(s) match no base weight in {other}: {shown}\n" in warned.stderr
    _no_control(warned.stderr + warned.stdout)
    assert warned.stderr.count("\n") == len([line for line in warned.stderr.splitlines() if line.startswith("warning: ")])


def test_prune_selection_lines_are_escaped(evil):
    base, adapter = evil
    result = run("prune", base, adapter, "--top", "4", "--dry-run")
    assert result.exit_code == 0
    _no_control(result.stdout)
    assert len(result.stdout.splitlines()) == 1 + 4 + 1


# ---------------------------------------------------------------------------------------
# 9. ReDoS: rank_pattern / alpha_pattern keys are bounded


def _patterned(tmp_path, prefix: str, alpha_pattern: dict):
    base, _ = write_llama_pair(tmp_path / "in", layers=1)
    tensors = {k.replace("base_model.model.", f"base_model.model.{prefix}."): v for k, v in llama_peft_tensors(1).items()}
    adapter = write_peft_dir(tmp_path / "patterned", tensors, peft_config(4, 8, alpha_pattern=alpha_pattern))
    return base, adapter


def test_a_catastrophically_backtracking_pattern_is_refused_quickly(tmp_path):
    base, adapter = _patterned(tmp_path, "a" * 40, {"(a|aa)+b": 16})
    before = snapshot(base, adapter)
    start = time.monotonic()
    result = run("check", "--base", base, "--max-ddi", "1", adapter)
    elapsed = time.monotonic() - start
    module = "a" * 40 + ".model.layers.0.self_attn.k_proj"
    assert_error(result, 3, f"adapter config pattern '(a|aa)+b': took over 0.1 s to match {module} "
                            "(catastrophic backtracking); refused")
    assert elapsed < 10  # with re: about 2^40 steps, years
    assert snapshot(base, adapter) == before


def test_the_issue_pattern_finishes_and_is_matched_as_peft_matches(tmp_path):
    base, adapter = _patterned(tmp_path, "model", {"(.*.*)*X": 16, r"layers\.0\.self_attn\.q_proj": 80})
    start = time.monotonic()
    result = run("report", base, adapter, "--format", "json")
    assert time.monotonic() - start < 10
    assert result.exit_code == 0, result.stderr
    scales = {m["name"]: m["scale"] for m in json.loads(result.stdout)["modules"]}
    assert scales["model.model.layers.0.self_attn.q_proj"] == pytest.approx(80 / 4)  # the matching key
    assert scales["model.model.layers.0.self_attn.k_proj"] == pytest.approx(8 / 4)  # no key matches: lora_alpha


@pytest.mark.parametrize("pattern,message", [
    ("q_proj(", "adapter config pattern 'q_proj(': not a valid regular expression (missing ) at position 7)"),
    ("x" * 1001, "adapter config pattern 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'...: longer than 1000 characters"),
])
def test_an_invalid_pattern_is_a_one_line_error(tmp_path, pattern, message):
    base, adapter = _patterned(tmp_path, "model", {pattern: 16})
    result = run("report", base, adapter)
    assert_error(result, 3, message)


# ---------------------------------------------------------------------------------------
# 13. A rank above min(d, k) costs the factors' memory, not r²


def test_a_rank_far_above_d_and_k_is_scored_in_the_factors_memory(tmp_path):
    """r = 200 000 on an 8 × 16 k_proj: a 19 MB adapter whose r × r Gram matrices would
    take 320 GB. Scored as the same ΔW factored at rank 8, in a process limited to 2 GB."""
    base, _ = write_llama_pair(tmp_path / "in", layers=1)
    rank, key = 200_000, "base_model.model.model.layers.0.self_attn.k_proj"
    g = np.random.default_rng(0)
    down = (g.standard_normal((rank, 16)) / 400).astype(np.float32)
    up = (g.standard_normal((8, rank)) / 400).astype(np.float32)
    wide = write_peft_dir(tmp_path / "wide", {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up},
                          peft_config(rank, 8))
    delta = up.astype(np.float64) @ down.astype(np.float64)
    u, sv, vt = np.linalg.svd(delta, full_matrices=False)
    narrow = write_peft_dir(tmp_path / "narrow", {f"{key}.lora_A.weight": (vt * sv[:, None]).astype(np.float64),
                                                  f"{key}.lora_B.weight": u}, peft_config(8, 8))
    before = snapshot(base, wide)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)); "
            "from ddiscan.cli import main; sys.argv[0] = 'ddiscan'; main()")
    env = {k: v for k, v in os.environ.items() if k != "DDISCAN_DEBUG"}
    reports = []
    for adapter in (wide, narrow):
        proc = subprocess.run([sys.executable, "-c", code, "report", str(base), str(adapter), "--scaling", "1",
                               "--t", "4", "--format", "json", "--exact"], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        reports.append(json.loads(proc.stdout)["modules"][0])
    wide_row, narrow_row = reports
    assert (wide_row["r"], narrow_row["r"], wide_row["t"]) == (rank, 8, 4)
    for field in ("sharpness", "deviation", "magnitude_norm", "ddi", "delta_norm"):
        assert wide_row[field] == pytest.approx(narrow_row[field], rel=1e-5), field
    assert snapshot(base, wide) == before


# ---------------------------------------------------------------------------------------
# 14. Reports fed to prune --from-report


@pytest.fixture
def scanned(tmp_path):
    base, adapter = write_llama_pair(tmp_path / "in", layers=1)
    result = run("report", base, adapter, "--format", "json")
    assert result.exit_code == 0
    return adapter, json.loads(result.stdout)


def _first(field, value):
    def change(data):
        data["modules"][0][field] = value
    return change


def _top(field, value):
    def change(data):
        data[field] = value
    return change


def _adapter_path(data):
    data["inputs"]["adapter"]["path"] = 5


@pytest.mark.parametrize("change,problem", [
    (_first("ddi", "abc"), "modules[0].ddi must be a finite number or null"),
    (_first("ddi", True), "modules[0].ddi must be a finite number or null"),
    (_first("ddi", None), "modules[0]: a finite module without its ddi/ddi_norm"),
    (_first("r", 4.5), "modules[0].r must be an integer"),
    (_first("name", 7), "modules[0]: name must be a unique string and finite a boolean"),
    (_first("finite", "yes"), "modules[0]: name must be a unique string and finite a boolean"),
    (_top("method", "bogus"), "unknown method 'bogus'"),
    (_top("modules", None), "no modules"),
    (_top("modules", [None]), "modules[0] is not a module row"),
    (_top("parameters", []), "no parameters object"),
    (_top("inputs", None), "no inputs.adapter.path"),
])
def test_a_malformed_report_is_a_one_line_error(scanned, tmp_path, change, problem):
    adapter, data = scanned
    change(data)
    report = tmp_path / "report.json"
    report.write_text(json.dumps(data))
    before = snapshot(report, adapter)
    result = run("prune", "--from-report", report, adapter, "--top", "1", "-o", tmp_path / "out")
    assert_error(result, 3, f"{report}: not a ddiscan JSON report ({problem})")
    assert snapshot(report, adapter) == before
    assert not (tmp_path / "out").exists()


def test_a_report_whose_adapter_path_is_not_a_string(scanned, tmp_path):
    _, data = scanned
    _adapter_path(data)
    report = tmp_path / "report.json"
    report.write_text(json.dumps(data))
    result = run("prune", "--from-report", report, "--top", "1", "--dry-run")
    assert_error(result, 3, f"{report}: not a ddiscan JSON report (inputs.adapter.path is not a string)")


# ---------------------------------------------------------------------------------------
# 14/15. The top-level guard: usage errors, interrupts, bugs


@pytest.mark.parametrize("args,message", [
    (["report"], "Missing argument '[BASE] ADAPTER...'."),
    (["bogus"], "No such command 'bogus'."),
    (["--bogus"], "No such option '--bogus'."),
    (["report", "a", "b", "--format", "xml"],
     "Invalid value for '--format': 'xml' is not one of 'table', 'json', 'jsonl', 'csv', 'markdown'."),
    (["check", ADAPTER], "give --max-ddi and/or --max-ddi-norm"),
])
def test_a_usage_error_is_one_line(args, message):
    result = run(*args)
    assert_error(result, 2, message)


def test_an_escape_in_an_option_value_is_escaped():
    result = run("report", "a", "b", "--format", "\x1b[2Jx")
    assert_error(result, 2, "Invalid value for '--format': '\\x1b[2Jx' is not one of 'table', 'json', 'jsonl', "
                            "'csv', 'markdown'.")


def test_an_unexpected_exception_is_an_internal_error(monkeypatch, pair):
    base, adapter = pair

    def broken(*args, **kwargs):
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(sys.modules["ddiscan.check"], "scan_many", broken)
    result = run("report", base, adapter)
    assert_error(result, 70, "internal error: ZeroDivisionError: float division by zero (please report)")
    monkeypatch.setenv("DDISCAN_DEBUG", "1")
    result = run("report", base, adapter)
    assert result.exit_code == 1 and isinstance(result.exception, ZeroDivisionError)


def test_an_interrupt_is_exit_130(monkeypatch, pair):
    base, adapter = pair

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["ddiscan.check"], "scan_many", interrupted)
    assert_error(run("report", base, adapter), 130, "interrupted")


def test_a_real_sigint_exits_130(pair):
    base, adapter = pair
    code = ("import os, signal, sys, time, ddiscan.cli as c\n"
            "def scan(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(30)\n"
            "sys.modules['ddiscan.check'].scan_many = scan\n"
            "c.main()\n")
    env = {k: v for k, v in os.environ.items() if k != "DDISCAN_DEBUG"}
    proc = subprocess.run([sys.executable, "-c", code, "report", str(base), str(adapter)], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 130
    assert proc.stderr == "Error: interrupted\n"
    assert proc.stdout == ""


def test_a_real_usage_error_is_one_line():
    env = {k: v for k, v in os.environ.items() if k != "DDISCAN_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "ddiscan.cli", "check", "--max-ddi", "nan", "x"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "Error: Invalid value for '--max-ddi': 'nan' is not a finite number\n"


# ---------------------------------------------------------------------------------------
# 15. A finite base near float32's limit is finite, and no numpy warning is printed


def test_a_base_near_the_float32_limit_is_scored(tmp_path):
    tensors = llama_base_tensors(1)
    key = "model.layers.0.self_attn.q_proj.weight"
    w = tensors[key]
    tensors[key] = (w / np.abs(w).max() * 3.3e38).astype(np.float32)
    assert np.isfinite(tensors[key]).all()
    base, adapter = write_llama_pair(tmp_path / "in", layers=1, base_tensors=tensors)
    before = snapshot(base, adapter)
    env = {k: v for k, v in os.environ.items() if k != "DDISCAN_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "ddiscan.cli", "report", str(base), str(adapter), "--format", "json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0
    assert proc.stderr == ""  # no "NaN or Inf" warning, no RuntimeWarning
    rows = {m["name"]: m for m in json.loads(proc.stdout)["modules"]}
    q = rows["model.layers.0.self_attn.q_proj"]
    assert q["finite"] is True
    w64 = tensors[key].astype(np.float64)
    assert q["base_norm"] == pytest.approx(math.sqrt(float(np.sum(w64 * w64))), rel=1e-6)
    exact = json.loads(run("report", base, adapter, "--format", "json", "--exact").stdout)
    assert {m["name"]: m["deviation"] for m in exact["modules"]}["model.layers.0.self_attn.q_proj"] == \
        pytest.approx(q["deviation"], rel=1e-4)
    assert snapshot(base, adapter) == before


# ---------------------------------------------------------------------------------------
# 14. exclude_modules in drop mode, DoRA magnitudes, names the system refuses


@pytest.mark.parametrize("value,shown", [(5, "5"), ([["a"]], "[['a']]"), ({"a": 1}, "{'a': 1}")])
def test_a_malformed_exclude_modules_is_a_one_line_error(tmp_path, value, shown):
    """Refused when the config is read (its schema), before anything is scanned or written."""
    base, adapter = write_llama_pair(tmp_path / "in", layers=1, config=peft_config(4, 8, exclude_modules=value))
    before = snapshot(base, adapter)
    result = run("prune", base, adapter, "--top", "1", "--mode", "drop", "-o", tmp_path / "out")
    assert_error(result, 3, f"{adapter / 'adapter_config.json'}: 'exclude_modules' must be a string or "
                            f"a list of strings, not {shown}")
    assert snapshot(base, adapter) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize("magnitude,described", [(np.ones(5, np.float32), "F32 [5]"), (np.ones(16, np.int8), "I8 [16]")])
@pytest.mark.parametrize("command", ["report", "prune"])
def test_a_dora_magnitude_of_the_wrong_size_or_dtype_fails_report_and_prune(tmp_path, magnitude, described, command):
    base, _ = write_llama_pair(tmp_path / "in", layers=1)
    tensors = llama_peft_tensors(1)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    tensors[key] = magnitude
    adapter = write_peft_dir(tmp_path / "dora", tensors, peft_config(4, 8, use_dora=True))
    before = snapshot(base, adapter)
    args = ["report", base, adapter] if command == "report" else ["prune", base, adapter, "--top", "4", "-o",
                                                                   tmp_path / "out"]
    result = run(*args)
    assert_error(result, 3, f"{adapter / 'adapter_model.safetensors'}: {key} is {described}; "
                            "a DoRA magnitude of this module must hold 16 floats")
    assert snapshot(base, adapter) == before
    assert not (tmp_path / "out").exists()


LONG = "x" * 300


@pytest.mark.parametrize("args,code,bad", [
    (["report", LONG, "{adapter}"], 3, LONG),
    (["report", "{base}", LONG], 3, LONG),
    (["report", "{base}", "{adapter}", "--method", "safelora", "--aligned", LONG, "--unaligned", "{base}"], 3, LONG),
    (["report", "{base}", "{adapter}", "--profiles", LONG], 3, LONG),
    (["check", "--base", LONG, "--max-ddi", "1", "{adapter}"], 3, LONG),
    (["check", "--base", "{base}", "--max-ddi", "1", LONG + ".safetensors"], 3, LONG + ".safetensors"),
    (["profile", LONG, "-o", "{tmp}/p.ddiprofile"], 3, LONG),
    (["prune", "--from-report", LONG, "--top", "1", "--dry-run"], 3, LONG),
    (["report", "{base}", "{adapter}", "-o", "{tmp}/" + LONG], 4, "{tmp}/" + LONG),
    (["report", "{base}", "{adapter}", "-o", "{tmp}/" + LONG + "/r.json"], 4, "{tmp}/" + LONG + "/r.json"),
    (["report", "{base}", "{adapter}", "{adapter}", "-o", "{tmp}/" + LONG], 4, "{tmp}/" + LONG),
    (["prune", "{base}", "{adapter}", "--top", "1", "-o", "{tmp}/" + LONG], 4, "{tmp}/" + LONG),
    (["prune", "{base}", "{adapter}", "--top", "1", "--dry-run", "--report-out", "{tmp}/" + LONG], 4, "{tmp}/" + LONG),
    (["profile", "{base}", "-o", "{tmp}/" + LONG + ".ddiprofile"], 4, "{tmp}/" + LONG + ".ddiprofile"),
])
def test_a_name_too_long_is_a_one_line_error(pair, tmp_path, args, code, bad):
    base, adapter = pair
    before = snapshot(base, adapter)
    fill = {"base": base, "adapter": adapter, "tmp": tmp_path}
    result = run(*(a.format(**fill) for a in args))
    what = "cannot read" if code == 3 else "cannot write"
    assert_error(result, code, f"{bad.format(**fill)}: {what} (File name too long)")
    assert snapshot(base, adapter) == before


def test_a_closed_stdout_stops_quietly_with_141():
    """`ddiscan report ... | head`: the reader goes away; no traceback, no 'internal error'."""
    proc = subprocess.Popen([sys.executable, "-m", "ddiscan.cli", "report", str(ROOT / "fixtures" / "tiny-llama"),
                             str(ROOT / "fixtures" / "tiny-lora"), "--format", "jsonl"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    proc.stdout.close()  # before ddiscan writes: its first write meets a closed pipe
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode, err) == (141, b"")
