"""``ddiscan report`` on bad inputs and options: the right exit code, one ``Error:`` line on
stderr naming the file or key, no traceback; and its outputs in every format."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from ddiscan.cli import cli
from ddiscan.io.reader import MAX_HEADER_SIZE

from safetensors_builders import (
    HIDDEN,
    contiguous_header,
    entry,
    llama_base_tensors,
    llama_peft_tensors,
    peft_tensors_without,
    lora_pair,
    peft_config,
    raw_safetensors,
    save,
    write_index,
    write_llama_pair,
)

# click 8.2+ keeps stderr apart from stdout in every result (the mix_stderr flag is gone);
# older click needs CliRunner(mix_stderr=False).
try:
    RUNNER = CliRunner(mix_stderr=False)
except TypeError:
    RUNNER = CliRunner()


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("DDISCAN_DEBUG", raising=False)


def invoke(*args):
    return RUNNER.invoke(cli, ["report", *map(str, args)])


def assert_one_error_line(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit) or result.exception is None
    assert "Traceback" not in result.stdout and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("Error: ")
    for needle in needles:
        assert needle in line, (needle, line)
    assert result.stdout == ""
    return line


# ---------------------------------------------------------------------------------------
# Bad inputs: each builder returns (base, adapter, what the error line must name)


def _good(tmp):
    return write_llama_pair(tmp, layers=1, config=peft_config(4, 8))


def _bad_base_file(build):
    """A case whose base is a malformed single file written by ``build(path)``."""
    def case(tmp):
        _, adapter = _good(tmp)
        path = tmp / "bad" / "model.safetensors"
        build(path)
        return path, adapter, [str(path)]
    return case


def _bad_adapter_file(build):
    def case(tmp):
        base, _ = _good(tmp)
        path = tmp / "bad" / "adapter_model.safetensors"
        build(path)
        return base, path, [str(path)]
    return case


def _huge_header(path):
    raw_safetensors(path, {}, header_len=MAX_HEADER_SIZE + 8)
    with open(path, "r+b") as f:
        f.truncate(MAX_HEADER_SIZE + 1024)


def _truncated(path):
    save(path, llama_base_tensors(1))
    path.write_bytes(path.read_bytes()[:-3])


def _two(dtype_a="F32", a=(0, 4), b=(4, 8), size=8, shape_b=(1,)):
    return lambda path: raw_safetensors(path, {"a": entry(dtype_a, [1], *a), "b": entry("F32", list(shape_b), *b)}, size)


def _adapter_case(tensors_fn, config=None, base_fn=None, needles=()):
    def case(tmp):
        base_tensors = base_fn() if base_fn else llama_base_tensors(1)
        base, adapter = write_llama_pair(tmp, layers=1, adapter_tensors=tensors_fn(), base_tensors=base_tensors,
                                         config=config or peft_config(4, 8))
        return base, adapter, list(needles)
    return case


def _with_base(key, value):
    def base():
        t = llama_base_tensors(1)
        t[key] = value
        return t
    return base


def _missing_base(tmp):
    _, adapter = _good(tmp)
    return tmp / "nowhere", adapter, [str(tmp / "nowhere")]


def _missing_adapter(tmp):
    base, _ = _good(tmp)
    return base, tmp / "no-adapter", [str(tmp / "no-adapter")]


def _pickled_base(tmp):
    _, adapter = _good(tmp)
    path = tmp / "pytorch_model.bin"
    path.write_bytes(pickle.dumps({"w": [1.0]}, protocol=2))
    return path, adapter, [str(path)]


def _pickle_dir_base(tmp):
    _, adapter = _good(tmp)
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "pytorch_model.bin").write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))
    return tmp / "ckpt", adapter, ["pytorch_model.bin"]


def _pickled_adapter_dir(tmp):
    base, _ = _good(tmp)
    (tmp / "peft").mkdir()
    (tmp / "peft" / "adapter_model.bin").write_bytes(pickle.dumps({"w": [1.0]}, protocol=2))
    return base, tmp / "peft", ["adapter_model.bin"]


def _empty_dir_base(tmp):
    _, adapter = _good(tmp)
    (tmp / "empty").mkdir()
    return tmp / "empty", adapter, [str(tmp / "empty")]


def _adapter_dir_without_model(tmp):
    base, _ = _good(tmp)
    (tmp / "peft").mkdir()
    (tmp / "peft" / "adapter_config.json").write_text(json.dumps(peft_config()))
    return base, tmp / "peft", [str(tmp / "peft")]


def _ambiguous(tmp):
    tensors = llama_base_tensors(1)
    tensors["vision.model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"]
    tensors["text.model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"]
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    base, adapter = write_llama_pair(tmp, layers=1, base_tensors=tensors,
                                     adapter_tensors=llama_peft_tensors(1, 4, projs=("q_proj",)))
    return base, adapter, ["vision.model.layers.0.self_attn.q_proj.weight", "text.model.layers.0.self_attn.q_proj.weight"]


def _unsupported_adapter_dtype(tmp):
    base, _ = _good(tmp)
    # lora_A in F4 (valid in the format, unreadable by numpy), lora_B in F32
    stem = "base_model.model.model.layers.0.self_attn.q_proj"
    header, size = contiguous_header([
        (f"{stem}.lora_A.weight", "F4", [4, HIDDEN], 4 * HIDDEN // 2),
        (f"{stem}.lora_B.weight", "F32", [HIDDEN, 4], HIDDEN * 4 * 4),
    ])
    path = raw_safetensors(tmp / "a" / "adapter_model.safetensors", header, size)
    return base, path, [f"{stem}.lora_A.weight"]


def _index_case(mutate):
    def case(tmp):
        _, adapter = _good(tmp)
        tensors = llama_base_tensors(1)
        half = {k: v for k, v in tensors.items() if "q_proj" in k or "k_proj" in k}
        index = write_index(tmp / "sharded", {
            "model-00001-of-00002.safetensors": half,
            "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if k not in half},
        })
        return index, adapter, mutate(index)
    return case


def _index_points_to_the_wrong_shard(index):
    data = json.loads(index.read_text())
    data["weight_map"]["model.layers.0.self_attn.v_proj.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    return ["model.layers.0.self_attn.v_proj.weight"]


def _index_not_json(index):
    index.write_text("{weight_map: }")
    return [str(index)]


def _index_shard_outside(index):
    data = json.loads(index.read_text())
    data["weight_map"]["lm_head.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    return [str(index), "../elsewhere.safetensors"]


def _index_shard_missing(index):
    (index.parent / "model-00002-of-00002.safetensors").unlink()
    return ["model-00002-of-00002.safetensors"]


def _kohya_rank_zero(tmp):
    base = save(tmp / "te.safetensors", {"text_model.encoder.layers.0.self_attn.q_proj.weight": np.ones((HIDDEN, HIDDEN), np.float32)})
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    adapter = save(tmp / "lora.safetensors", {
        f"{name}.lora_down.weight": np.zeros((0, HIDDEN), np.float32),
        f"{name}.lora_up.weight": np.zeros((HIDDEN, 0), np.float32),
        f"{name}.alpha": np.array(1.0, np.float32),
    })
    return base, adapter, [name]


CASES = {
    "missing base": _missing_base,
    "missing adapter": _missing_adapter,
    "header over 100 MB": _bad_base_file(_huge_header),
    "header beyond file size": _bad_base_file(lambda p: raw_safetensors(p, {}, header_len=1 << 20)),
    "truncated data": _bad_base_file(_truncated),
    "invalid json": _bad_base_file(lambda p: raw_safetensors(p, '{"a": ')),
    "header not an object": _bad_base_file(lambda p: raw_safetensors(p, "[1, 2]")),
    "duplicate keys": _bad_base_file(lambda p: raw_safetensors(
        p, '{"k": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
           '"k": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4)),
    "offset gap": _bad_base_file(_two(b=(6, 10), size=10)),
    "offset overlap": _bad_base_file(_two(b=(2, 6), size=6)),
    "offset out of range": _bad_base_file(_two(b=(4, 12), shape_b=(2,), size=8)),
    "byte size": _bad_base_file(lambda p: raw_safetensors(p, {"a": entry("F32", [3], 0, 8)}, 8)),
    "unknown dtype": _bad_base_file(lambda p: raw_safetensors(p, {"a": entry("Q4", [8], 0, 4)}, 4)),
    "metadata not strings": _bad_base_file(lambda p: raw_safetensors(p, {"__metadata__": {"n": 1}})),
    "empty base file": _bad_base_file(lambda p: (p.parent.mkdir(parents=True, exist_ok=True), p.write_bytes(b""))),
    "empty adapter file": _bad_adapter_file(lambda p: (p.parent.mkdir(parents=True, exist_ok=True), p.write_bytes(b""))),
    "adapter zip": _bad_adapter_file(lambda p: (p.parent.mkdir(parents=True, exist_ok=True),
                                                p.write_bytes(b"PK\x03\x04" + bytes(60)))),
    "adapter truncated": _bad_adapter_file(lambda p: (save(p, llama_peft_tensors(1, 4)),
                                                      p.write_bytes(p.read_bytes()[:-1]))),
    "pickled base .bin": _pickled_base,
    "directory with only a pickle": _pickle_dir_base,
    "adapter directory with only a pickle": _pickled_adapter_dir,
    "empty directory as base": _empty_dir_base,
    "adapter directory without model": _adapter_dir_without_model,
    "unmatched module": _adapter_case(
        lambda: {**llama_peft_tensors(1, 4, projs=("q_proj",)),
                 "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight": lora_pair(32, HIDDEN, 4)[0],
                 "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight": lora_pair(32, HIDDEN, 4)[1]},
        needles=["model.layers.0.mlp.gate_proj"]),
    "ambiguous": _ambiguous,
    "lora_A without lora_B": _adapter_case(peft_tensors_without("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"),
                                           needles=["model.layers.0.self_attn.k_proj.lora_A.weight"]),
    "shape mismatch": _adapter_case(
        lambda: {"base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": lora_pair(HIDDEN, HIDDEN, 4)[0],
                 "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": lora_pair(HIDDEN, HIDDEN, 4)[1]},
        needles=["model.layers.0.self_attn.v_proj.weight"]),
    "rank mismatch": _adapter_case(
        lambda: {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": lora_pair(HIDDEN, HIDDEN, 4)[0],
                 "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": lora_pair(HIDDEN, HIDDEN, 3)[1]},
        needles=["q_proj.lora_B.weight"]),
    "config r contradicts tensors": _adapter_case(lambda: llama_peft_tensors(1, 4), config=peft_config(16, 32),
                                                  needles=["adapter_config.json", "r=16"]),
    "quantized absmax": _adapter_case(
        lambda: llama_peft_tensors(1, 4, projs=("q_proj",)),
        base_fn=_with_base("model.layers.0.self_attn.q_proj.weight.absmax", np.ones(2, np.float32)),
        needles=["model.layers.0.self_attn.q_proj.weight"]),
    "quantized weight_scale_inv": _adapter_case(
        lambda: llama_peft_tensors(1, 4, projs=("q_proj",)),
        base_fn=_with_base("model.layers.0.self_attn.q_proj.weight_scale_inv", np.ones(2, np.float32)),
        needles=["model.layers.0.self_attn.q_proj.weight"]),
    "quantized u8": _adapter_case(
        lambda: llama_peft_tensors(1, 4, projs=("q_proj",)),
        base_fn=_with_base("model.layers.0.self_attn.q_proj.weight", np.zeros((HIDDEN, HIDDEN), np.uint8)),
        needles=["model.layers.0.self_attn.q_proj.weight", "U8"]),
    "no lora pairs": _adapter_case(lambda: {"base_model.model.lm_head.weight": np.ones((4, 4), np.float32)}),
    "unsupported adapter dtype": _unsupported_adapter_dtype,
    "index points to the wrong shard": _index_case(_index_points_to_the_wrong_shard),
    "index not json": _index_case(_index_not_json),
    "index shard outside the directory": _index_case(_index_shard_outside),
    "index shard missing": _index_case(_index_shard_missing),
    "peft rank zero": _adapter_case(
        lambda: {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((0, HIDDEN), np.float32),
                 "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((HIDDEN, 0), np.float32)},
        config=peft_config(8, 8), needles=["model.layers.0.self_attn.q_proj"]),
    "kohya rank zero": _kohya_rank_zero,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line_exit_3(tmp_path, case):
    base, adapter, needles = CASES[case](tmp_path)
    result = invoke(base, adapter)
    line = assert_one_error_line(result, 3, *needles)
    if not needles:  # at least a file is named
        assert str(adapter) in line or str(base) in line


def test_real_process_prints_one_line_and_no_traceback(tmp_path):
    _, adapter = _good(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "DDISCAN_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "ddiscan.cli", "report", str(tmp_path / "missing"), str(adapter)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 3
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("Error: ") and str(tmp_path / "missing") in proc.stderr


# ---------------------------------------------------------------------------------------
# Usage errors (exit 2)


@pytest.mark.parametrize("options,needle", [
    (["--t", "1", "--t-mult", "2"], "--t"),
    (["--alpha", "1", "--scaling", "1"], "--alpha"),
])
def test_contradicting_options(tmp_path, options, needle):
    base, adapter = _good(tmp_path)
    result = invoke(base, adapter, *options)
    assert_one_error_line(result, 2, needle)


@pytest.mark.parametrize("options", [["--format", "xml"], ["--t", "0"], ["--magnitude", "huge"], ["--device", "tpu"],
                                     ["--oversample", "-1"]])
def test_bad_option_values(tmp_path, options):
    base, adapter = _good(tmp_path)
    result = invoke(base, adapter, *options)
    assert result.exit_code == 2
    assert "Error:" in result.stderr and options[0] in result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


@pytest.mark.parametrize("options", [["--scaling", "nan"], ["--scaling", "inf"], ["--alpha", "inf"], ["--alpha", "-nan"]])
def test_non_finite_scaling_option_is_a_usage_error(tmp_path, options):
    base, adapter = _good(tmp_path)
    result = invoke(base, adapter, "--format", "json", *options)
    assert_one_error_line(result, 2, options[0])


def test_output_equal_to_an_input_is_refused(tmp_path):
    base, adapter = _good(tmp_path)
    adapter_file = adapter / "adapter_model.safetensors"
    before = (base.read_bytes(), adapter_file.read_bytes())
    for output, args in [(base, (base, adapter)), (adapter_file, (base, adapter_file))]:
        result = invoke(*args, "-o", output)
        assert_one_error_line(result, 2, str(output))
    assert (base.read_bytes(), adapter_file.read_bytes()) == before


def test_output_through_a_symlink_to_an_input_is_refused(tmp_path):
    base, adapter = _good(tmp_path)
    before = base.read_bytes()
    link = tmp_path / "report.json"
    link.symlink_to(base)
    result = invoke(base, adapter, "-o", link)
    assert_one_error_line(result, 2, str(link))
    assert base.read_bytes() == before and link.is_symlink()
    # and the other way round: the input given through a link, the output the real file
    result = invoke(link, adapter, "-o", base)
    assert_one_error_line(result, 2, str(base))
    assert base.read_bytes() == before


def test_output_hard_link_to_an_input_is_refused(tmp_path):
    base, adapter = _good(tmp_path)
    before = base.read_bytes()
    hard = tmp_path / "out.json"
    os.link(base, hard)
    result = invoke(base, adapter, "-o", hard)
    assert_one_error_line(result, 2, str(hard))
    assert base.read_bytes() == before


def test_output_into_a_missing_directory_is_an_io_error(tmp_path):
    base, adapter = _good(tmp_path)
    target = tmp_path / "no" / "such" / "dir" / "out.json"
    result = invoke(base, adapter, "-o", target)
    assert_one_error_line(result, 4, str(target))


# ---------------------------------------------------------------------------------------
# Outputs


def test_output_file_is_json_written_atomically(tmp_path):
    base, adapter = write_llama_pair(tmp_path / "in", layers=2, config=peft_config(4, 8))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "out.json").write_text("old content")
    result = invoke(base, adapter, "-o", out_dir / "out.json")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert sorted(os.listdir(out_dir)) == ["out.json"]
    data = json.loads((out_dir / "out.json").read_text())
    assert len(data["modules"]) == 8
    assert [m["rank"] for m in data["modules"]] == list(range(1, 9))
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("layers", [1, 2])
def test_formats_parse(tmp_path, layers):
    base, adapter = write_llama_pair(tmp_path, layers=layers, config=peft_config(4, 8))
    n = 4 * layers

    result = invoke(base, adapter, "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    names = [m["name"] for m in data["modules"]]
    assert sorted(names) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(layers)
                                   for p in ("q_proj", "k_proj", "v_proj", "o_proj"))

    result = invoke(base, adapter, "--format", "csv")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == n
    assert [r["name"] for r in rows] == names
    assert [float(r["ddi"]) for r in rows] == pytest.approx([m["ddi"] for m in data["modules"]])

    result = invoke(base, adapter, "--format", "markdown")
    assert result.exit_code == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(table) == n + 2
    assert set(table[1].replace("|", "").replace(":", "").replace("-", "")) == set()
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert [line.split("|")[2].strip() for line in table[2:]] == names

    result = invoke(base, adapter, "-o", tmp_path / "r.csv", "--format", "csv", "-q")
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""
    assert len(list(csv.DictReader(open(tmp_path / "r.csv", newline="")))) == n


def test_nan_in_a_lora_tensor_marks_the_module_non_finite(tmp_path):
    tensors = llama_peft_tensors(1, 4)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    tensors[key] = tensors[key].copy()
    tensors[key][3, 1] = np.nan
    base, adapter = write_llama_pair(tmp_path, layers=1, adapter_tensors=tensors, config=peft_config(4, 8))
    result = invoke(base, adapter, "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # valid JSON: no NaN literals
    modules = {m["name"]: m for m in data["modules"]}
    bad = modules["model.layers.0.self_attn.v_proj"]
    assert bad["finite"] is False and bad["ddi"] is None and bad["rank"] is None
    assert all(m["finite"] and m["ddi"] is not None for n, m in modules.items() if n != "model.layers.0.self_attn.v_proj")
    assert data["modules"][-1]["name"] == "model.layers.0.self_attn.v_proj"
    assert data["summary"]["non_finite"] == 1
    assert "model.layers.0.self_attn.v_proj" in result.stderr and "Traceback" not in result.stderr

    result = invoke(base, adapter)
    assert result.exit_code == 0
    last_row = result.stdout.splitlines()[-2].split()
    assert last_row[:2] == ["-", "model.layers.0.self_attn.v_proj"]


@pytest.mark.parametrize("alpha", [np.nan, np.inf])
def test_non_finite_kohya_alpha_marks_the_module_non_finite(tmp_path, alpha):
    base = save(tmp_path / "te.safetensors", {
        "text_model.encoder.layers.0.self_attn.q_proj.weight": np.eye(HIDDEN, dtype=np.float32),
        "text_model.encoder.layers.0.self_attn.k_proj.weight": np.eye(HIDDEN, dtype=np.float32),
    })
    tensors = {}
    for i, proj in enumerate(("q_proj", "k_proj")):
        name = f"lora_te_text_model_encoder_layers_0_self_attn_{proj}"
        a, b = lora_pair(HIDDEN, HIDDEN, 4, seed=i)
        tensors.update({f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b,
                        f"{name}.alpha": np.array(alpha if proj == "q_proj" else 4.0, np.float32)})
    adapter = save(tmp_path / "lora.safetensors", tensors)
    result = invoke(base, adapter, "--format", "json")
    assert result.exit_code == 0, (result.stderr, result.exception)
    modules = {m["name"]: m for m in json.loads(result.stdout)["modules"]}
    assert modules["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]["finite"] is False
    assert modules["lora_te_text_model_encoder_layers_0_self_attn_k_proj"]["finite"] is True


def test_inf_in_the_base_marks_the_module_non_finite(tmp_path):
    base_tensors = llama_base_tensors(1)
    base_tensors["model.layers.0.self_attn.o_proj.weight"][0, 0] = np.inf
    base, adapter = write_llama_pair(tmp_path, layers=1, base_tensors=base_tensors, config=peft_config(4, 8))
    result = invoke(base, adapter, "--format", "json", "-q")
    assert result.exit_code == 0, result.stderr
    modules = {m["name"]: m for m in json.loads(result.stdout)["modules"]}
    assert modules["model.layers.0.self_attn.o_proj"]["finite"] is False
    assert sum(not m["finite"] for m in modules.values()) == 1


# ---------------------------------------------------------------------------------------
# Several reports in one directory: one file each, never one over another


def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_reports_of_adapters_with_the_same_name_get_distinct_files(tmp_path):
    base, adapter = _good(tmp_path / "in")
    x, y = tmp_path / "x" / "lora", tmp_path / "y" / "lora"
    for target in (x, y):
        target.parent.mkdir()
        os.symlink(adapter, target)  # PEFT directories, both named lora
    out = tmp_path / "out"
    result = RUNNER.invoke(cli, ["report", str(base), str(x), str(y), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and result.stderr == f"wrote 2 reports to {out}\n"
    assert _listing(out) == ["x-lora.json", "y-lora.json"]
    for name, source in (("x-lora.json", x), ("y-lora.json", y)):
        assert json.loads((out / name).read_text())["inputs"]["adapter"]["path"] == str(source)
    # files named by their stem, their parents where the stems are the same
    a = tmp_path / "runs" / "a.safetensors"
    a.parent.mkdir()
    os.symlink(adapter / "adapter_model.safetensors", a)
    result = RUNNER.invoke(cli, ["report", str(base), str(a), str(adapter / "adapter_model.safetensors"),
                                 "-o", str(tmp_path / "files")])
    assert result.exit_code == 0, result.stderr
    assert _listing(tmp_path / "files") == ["a.json", "adapter_model.json"]


def test_reports_whose_names_collide_are_refused_before_anything_is_written(tmp_path):
    base, adapter = _good(tmp_path / "in")
    twin = tmp_path / "in" / "adapter.safetensors"  # a file beside the directory of the same name
    os.symlink(adapter / "adapter_model.safetensors", twin)
    out = tmp_path / "out"
    result = RUNNER.invoke(cli, ["report", str(base), str(adapter), str(twin), "-o", str(out)])
    assert_one_error_line(result, 2, str(adapter), str(twin), str(out / "adapter.json"))
    assert not out.exists()


def test_one_report_is_counted_in_the_singular(tmp_path):
    base, adapter = _good(tmp_path / "in")
    out = tmp_path / "out"
    result = RUNNER.invoke(cli, ["report", str(base), str(adapter), str(adapter), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == f"wrote 1 report to {out}\n" and _listing(out) == ["adapter.json"]


def test_several_reports_into_an_existing_file_are_refused(tmp_path):
    base, adapter = _good(tmp_path / "in")
    out = tmp_path / "out"
    out.write_text("keep")
    result = RUNNER.invoke(cli, ["report", str(base), str(adapter), str(tmp_path / "in" / "base"), "-o", str(out)])
    assert_one_error_line(result, 2, str(out), "not a directory")
    assert out.read_text() == "keep"


# ---------------------------------------------------------------------------------------
# Options and optional dependencies are checked before any work or write


@pytest.mark.parametrize("command", ["report", "prune"])
def test_plot_of_an_unknown_format_fails_before_the_scan(tmp_path, command):
    base, adapter = _good(tmp_path / "in")
    extra = ["--top", "1", "-o", str(tmp_path / "pruned")] if command == "prune" else []
    result = RUNNER.invoke(cli, [command, str(base), str(adapter), *extra, "--plot", str(tmp_path / "p.gif")])
    assert_one_error_line(result, 2, "p.gif", ".png or .svg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize("command", ["report", "prune"])
def test_plot_without_matplotlib_fails_before_anything_is_written(tmp_path, monkeypatch, command):
    base, adapter = _good(tmp_path / "in")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    extra = ["--top", "1", "-o", str(tmp_path / "p"), "--report-out", str(tmp_path / "r.json")] \
        if command == "prune" else ["-o", str(tmp_path / "r.json")]
    result = RUNNER.invoke(cli, [command, str(base), str(adapter), *extra, "--plot", str(tmp_path / "p.png")])
    assert_one_error_line(result, 2, "matplotlib", "ddiscan[plot]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize("option", ["-o", "--report-out", "--plot"])
def test_prune_output_into_a_missing_directory_fails_before_anything_is_written(tmp_path, option):
    base, adapter = _good(tmp_path / "in")
    missing = tmp_path / "no" / "such" / ("p.png" if option == "--plot" else "out")
    outputs = {"-o": tmp_path / "pruned", "--report-out": tmp_path / "r.json", "--plot": tmp_path / "p.svg"}
    outputs[option] = missing
    args = [a for o, p in outputs.items() for a in (o, str(p))]
    result = RUNNER.invoke(cli, ["prune", str(base), str(adapter), "--top", "1", *args])
    assert_one_error_line(result, 4, str(missing))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]



def test_every_command_writes_its_wrote_line_on_stderr_and_only_data_on_stdout(tmp_path):
    base, adapter = _good(tmp_path / "in")
    profile = tmp_path / "base.ddiprofile"
    result = RUNNER.invoke(cli, ["profile", str(base), "-o", str(profile), "--max-t", "4"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and result.stderr.startswith(f"wrote {profile}: ") and result.stderr.count("\n") == 1
    pruned = tmp_path / "pruned.safetensors"
    result = RUNNER.invoke(cli, ["prune", str(base), str(adapter), "--top", "1", "-o", str(pruned)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("selected 1 of ") and "wrote" not in result.stdout
    assert result.stderr.splitlines()[-1].startswith(f"wrote {pruned} (zero mode; removed ")
    for command in (["profile", str(base), "-o", str(tmp_path / "q.ddiprofile")],
                    ["prune", str(base), str(adapter), "--top", "1", "-o", str(tmp_path / "q.safetensors")]):
        result = RUNNER.invoke(cli, [*command, "-q"])
        assert result.exit_code == 0 and "wrote" not in result.output, command
