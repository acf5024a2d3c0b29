"""Fuzzing: mutated safetensors files give a correct report or a clean ddiscan error, nothing else.

A small valid base (one 8×8 weight plus a bfloat16 and an empty tensor) and adapter (one
PEFT LoRA pair, rank 2) are written with the safetensors library; hypothesis then applies
one to three mutations to one of them: bytes flipped, inserted or deleted in the header
JSON (with or without fixing the length prefix), a number in a shape or an offset
replaced, a dtype string replaced, the length prefix replaced, the file truncated or
extended, bytes of the data region flipped (NaN, Inf, huge values). Every outcome must be

* a report that validates against ``ddiscan.load_schema()``, or
* a ``ddiscan.DdiscanError`` with exit code 3 and a one-line message,

never another exception. When ddiscan's reader accepts a mutated file, the safetensors
library must accept its header too (ddiscan enforces the format's rules, no looser).

``DDISCAN_FUZZ_EXAMPLES`` sets the number of library examples (default 1500, about 20 s
on one core, derandomized; with the variable set, random); the CLI test runs a tenth as many through ``ddiscan report`` and ``ddiscan
prune``. The counts run are printed (``-s``) and recorded as junit properties.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from collections import Counter
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import safetensors
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ddiscan
from ddiscan.cli import cli
from ddiscan.io.reader import DTYPE_BITS, SafetensorsFile

from safetensors_builders import save

EXAMPLES = int(os.environ.get("DDISCAN_FUZZ_EXAMPLES", "1500"))
CLI_EXAMPLES = max(50, EXAMPLES // 10)
SCHEMA = ddiscan.load_schema()
# The default run is derandomized (the same examples every time, so CI is not flaky);
# a run with DDISCAN_FUZZ_EXAMPLES set explores new ones each time.
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck),
                derandomize="DDISCAN_FUZZ_EXAMPLES" not in os.environ)

try:
    RUNNER = CliRunner(mix_stderr=False)
except TypeError:
    RUNNER = CliRunner()


def _originals() -> tuple[bytes, bytes]:
    g = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        base = save(Path(d) / "base.safetensors", {
            "model.layers.0.self_attn.q_proj.weight": g.standard_normal((8, 8)).astype(np.float32),
            "model.layers.0.mlp.up_proj.weight": g.standard_normal((4, 8)).astype(np.float16),
            "model.norm.weight": np.ones(8, np.float32),
            "model.empty": np.zeros((0, 3), np.float32),
        })
        adapter = save(Path(d) / "adapter.safetensors", {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": g.standard_normal((2, 8)).astype(np.float32),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": g.standard_normal((8, 2)).astype(np.float32),
        }, metadata={"format": "pt"})
        return base.read_bytes(), adapter.read_bytes()


BASE, ADAPTER = _originals()

NUMBERS = st.one_of(
    st.integers(-3, 70),
    st.sampled_from([2**31 - 1, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**80, 10**30]),
    st.integers(-(2**65), 2**65),
)
DTYPES = st.one_of(st.sampled_from(sorted(DTYPE_BITS)), st.sampled_from(["", "f32", "Q4", "F32 ", "F128", "null"]))


def _split(data: bytes) -> tuple[int, bytes, bytes]:
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    return n, data[8:8 + n], data[8 + n:]


def _join(header: bytes, rest: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + rest


@st.composite
def mutation(draw, data: bytes) -> bytes:
    n, header, rest = _split(data)
    kind = draw(st.sampled_from(
        ["flip", "insert", "insert-fixed", "delete", "delete-fixed", "number", "dtype", "prefix", "truncate",
         "extend", "data"]))
    if kind in ("flip", "insert", "insert-fixed", "delete", "delete-fixed") and len(data) > 8:
        end = min(len(data), 8 + max(n, 1))
        pos = draw(st.integers(8, max(8, end - 1)))
        if kind == "flip":
            return data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1:]
        if kind.startswith("insert"):
            junk = draw(st.one_of(st.binary(min_size=1, max_size=4), st.sampled_from([b"{", b"}", b",", b'"', b"[", b"]", b"0", b"-", b"\\"])))
            new = data[:pos] + junk + data[pos:]
        else:
            new = data[:pos] + data[pos + draw(st.integers(1, 4)):]
        if kind.endswith("fixed"):
            new = struct.pack("<Q", (n + len(new) - len(data)) % 2**64) + new[8:]
        return new
    if kind == "number":
        text = header.decode("utf-8", "replace")
        numbers = list(re.finditer(r"-?\d+", text))
        if numbers:
            m = numbers[draw(st.integers(0, len(numbers) - 1))]
            text = text[:m.start()] + str(draw(NUMBERS)) + text[m.end():]
            return _join(text.encode("utf-8"), rest)
    if kind == "dtype":
        text = header.decode("utf-8", "replace")
        found = list(re.finditer(r'"dtype":"([^"]*)"', text))
        if found:
            m = found[draw(st.integers(0, len(found) - 1))]
            text = text[:m.start(1)] + draw(DTYPES) + text[m.end(1):]
            return _join(text.encode("utf-8"), rest)
    if kind == "prefix":
        return struct.pack("<Q", draw(st.one_of(st.integers(0, len(data) + 16), st.integers(0, 2**64 - 1)))) + data[8:]
    if kind == "truncate":
        return data[:draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "extend":
        return data + draw(st.binary(min_size=1, max_size=16))
    if kind == "data" and rest:
        pos = 8 + n + draw(st.integers(0, len(rest) - 1))
        value = draw(st.sampled_from([0xFF, 0x7F, 0x80, 0x00])) if draw(st.booleans()) else data[pos] ^ draw(st.integers(1, 255))
        return data[:pos] + bytes([value]) + data[pos + 1:]
    return data  # a mutation that does not apply leaves the file as it is


@st.composite
def mutated_pair(draw) -> tuple[bytes, bytes, str]:
    target = draw(st.sampled_from(["base", "adapter"]))
    data = BASE if target == "base" else ADAPTER
    for _ in range(draw(st.integers(1, 3))):
        data = draw(mutation(data))
    return (data, ADAPTER, target) if target == "base" else (BASE, data, target)


def _library_error(path: Path) -> str | None:
    """Why the safetensors library refuses the file's header, or None when it opens it."""
    try:
        with safetensors.safe_open(str(path), framework="np") as f:
            f.keys()
    except Exception as exc:  # noqa: BLE001 (SafetensorError, OSError, ...)
        return repr(exc)
    return None


def _check_scan_only(base: Path, adapter: Path, outcomes: Counter) -> None:
    """A report that validates and is strict JSON, or a one-line ddiscan error with exit code 3."""
    try:
        report = ddiscan.scan(base, adapter)
    except ddiscan.DdiscanError as exc:
        assert exc.exit_code == 3, (type(exc).__name__, str(exc))
        assert str(exc) and "\n" not in str(exc), str(exc)
        outcomes[type(exc).__name__] += 1
    else:
        data = report.to_dict()
        jsonschema.validate(data, SCHEMA)
        json.dumps(data, allow_nan=False)
        outcomes["report"] += 1


def _check_scan(base: Path, adapter: Path, target: Path, outcomes: Counter) -> None:
    """:func:`_check_scan_only`, and ddiscan refuses no less than the safetensors library."""
    _check_scan_only(base, adapter, outcomes)
    try:
        SafetensorsFile(target)
    except ddiscan.DdiscanError:
        return
    error = _library_error(target)
    assert error is None, ("ddiscan accepts a file the safetensors library rejects", error, target.read_bytes()[:400])


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="ddiscan-fuzz-") as d:
        yield Path(d)


def test_fuzz_scan(workdir, record_property):
    outcomes: Counter = Counter()
    base, adapter = workdir / "base.safetensors", workdir / "adapter.safetensors"

    @settings(max_examples=EXAMPLES, **SETTINGS)
    @given(mutated_pair())
    def run(pair):
        base_bytes, adapter_bytes, target = pair
        base.write_bytes(base_bytes)
        adapter.write_bytes(adapter_bytes)
        _check_scan(base, adapter, base if target == "base" else adapter, outcomes)
        outcomes["examples"] += 1

    run()
    print(f"\nfuzz: {outcomes['examples']} examples through ddiscan.scan: {dict(outcomes)}")
    record_property("fuzz_scan_examples", outcomes["examples"])
    assert outcomes["examples"] >= EXAMPLES
    # the mutations reach both outcomes, and more than one kind of error
    assert outcomes["report"] > 0 and sum(v for k, v in outcomes.items() if k not in ("report", "examples")) > 0
    assert len(outcomes) >= 4


def test_fuzz_cli(workdir, record_property, monkeypatch):
    monkeypatch.delenv("DDISCAN_DEBUG", raising=False)
    counts: Counter = Counter()
    base, adapter = workdir / "cli-base.safetensors", workdir / "cli-adapter.safetensors"
    out = workdir / "out"
    out.mkdir()

    @settings(max_examples=CLI_EXAMPLES, **SETTINGS)
    @given(mutated_pair(), st.sampled_from(["report", "report -o", "prune"]))
    def run(pair, command):
        base_bytes, adapter_bytes, _ = pair
        base.write_bytes(base_bytes)
        adapter.write_bytes(adapter_bytes)
        target = out / ("report.json" if command == "report -o" else "pruned.safetensors")
        args = {"report": ["report", str(base), str(adapter)],
                "report -o": ["report", str(base), str(adapter), "-o", str(target)],
                "prune": ["prune", str(base), str(adapter), "--top", "1", "-o", str(target)]}[command]
        result = RUNNER.invoke(cli, args)
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert result.exit_code in (0, 3), (result.exit_code, result.stderr)
        assert "Traceback" not in result.stdout + result.stderr
        if result.exit_code:
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("Error: "), lines
            assert not any(out.iterdir())
        else:
            assert command == "report" or target.exists()
        assert not [p for p in out.iterdir() if "ddiscan-tmp" in p.name]
        assert base.read_bytes() == base_bytes and adapter.read_bytes() == adapter_bytes
        for p in out.iterdir():
            p.unlink()
        counts[result.exit_code] += 1

    run()
    total = sum(counts.values())
    print(f"\nfuzz: {total} examples through the CLI: exit codes {dict(counts)}")
    record_property("fuzz_cli_examples", total)
    assert total >= CLI_EXAMPLES and set(counts) == {0, 3}


# ---------------------------------------------------------------------------------------
# JSON inputs: adapter_config.json, a checkpoint index and a profile's metadata drawn as
# arbitrary JSON-ish text (valid values of any type, bombs, mutated valid files)

JSON_EXAMPLES = max(40, EXAMPLES // 25)
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)
CONFIG_FIELDS = ["r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
                 "exclude_modules", "fan_in_fan_out", "base_model_name_or_path", "revision", "peft_type", "init_r"]
BOMBS = st.sampled_from(["[" * 100_000, '{"a": ' + "[" * 200 + "]" * 200 + "}", "7" * 5000, "NaN", "-Infinity",
                         "1e999", "", "{", '"\\ud800"', "\x00", '{"a": 1, "a": 2}'])


@st.composite
def json_text(draw, valid: dict) -> str:
    kind = draw(st.sampled_from(["field", "value", "bomb", "mutate"]))
    if kind == "field":
        data = dict(valid)
        data[draw(st.sampled_from(sorted(set(CONFIG_FIELDS) | set(valid))))] = draw(JSON_VALUES)
        return json.dumps(data)
    if kind == "value":
        return json.dumps(draw(JSON_VALUES))
    if kind == "bomb":
        return draw(BOMBS)
    text = json.dumps(valid)
    pos = draw(st.integers(0, len(text)))
    return text[:pos] + draw(st.sampled_from(["[", "]", "{", "}", '"', ",", "NaN", "9" * 40, ""])) + text[pos + 1:]


def test_fuzz_json_inputs(tmp_path, record_property, monkeypatch):
    import shutil

    import safetensors.numpy

    monkeypatch.delenv("DDISCAN_DEBUG", raising=False)
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(fixtures / "tiny-llama", base)
    shutil.copytree(fixtures / "tiny-lora", adapter)
    profile = tmp_path / "base.ddiprofile"
    assert RUNNER.invoke(cli, ["profile", str(base), "-o", str(profile)]).exit_code == 0
    originals = {p: p.read_bytes() for p in (adapter / "adapter_config.json", base / "model.safetensors.index.json",
                                            profile)}
    tensors = safetensors.numpy.load_file(str(profile))
    with safetensors.safe_open(str(profile), framework="np") as f:
        meta = f.metadata()
    valid = {adapter / "adapter_config.json": json.loads(originals[adapter / "adapter_config.json"]),
             base / "model.safetensors.index.json": json.loads(originals[base / "model.safetensors.index.json"]),
             profile: json.loads(meta["ddiscan.profile"])}
    counts: Counter = Counter()

    @settings(max_examples=JSON_EXAMPLES, **SETTINGS)
    @given(st.sampled_from(sorted(valid, key=str)), st.data())
    def run(target, data):
        for path, content in originals.items():
            path.write_bytes(content)
        text = data.draw(json_text(valid[target]))
        if target == profile:
            safetensors.numpy.save_file(tensors, str(profile), metadata={**meta, "ddiscan.profile": text})
        else:
            target.write_text(text, encoding="utf-8", errors="surrogatepass")
        written = target.read_bytes()
        result = RUNNER.invoke(cli, ["report", str(profile if target == profile else base), str(adapter)])
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert result.exit_code in (0, 2, 3), (result.exit_code, result.stderr)
        assert "Traceback" not in result.stdout + result.stderr
        if result.exit_code:
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("Error: "), lines
        assert target.read_bytes() == written
        counts[result.exit_code] += 1

    run()
    total = sum(counts.values())
    print(f"\nfuzz: {total} JSON inputs through the CLI: exit codes {dict(counts)}")
    record_property("fuzz_json_examples", total)
    assert total >= JSON_EXAMPLES and counts[3] > 0


# --- quantized bases (issue 17) ------------------------------------------------------------

def _gguf_original(qtype_name: str) -> bytes:
    """The fuzz base's q_proj (8 × 32, so Q8_0's 32-value blocks fit) as a GGUF file."""
    gguf = pytest.importorskip("gguf")
    qtype = gguf.GGMLQuantizationType[qtype_name]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "base.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_head_count(2)
        writer.add_head_count_kv(2)
        weight = np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32)
        writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


@st.composite
def mutated_gguf(draw) -> bytes:
    data = _gguf_original(draw(st.sampled_from(["F32", "Q8_0"])))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "extend", "word"]))
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data = data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1:]
        elif kind == "truncate":
            data = data[:pos]
        elif kind == "extend":
            data = data + draw(st.binary(min_size=1, max_size=16))
        else:  # a length, count, type or offset field replaced by an extreme value
            data = data[:pos] + struct.pack("<Q", draw(NUMBERS) % 2**64) + data[pos + 8:]
        if not data:
            break
    return data


def test_fuzz_gguf_base(workdir, record_property):
    """Mutated GGUF bases: a report, or a one-line ddiscan error with exit code 3."""
    pytest.importorskip("gguf")
    outcomes: Counter = Counter()
    base, adapter = workdir / "fuzz.gguf", workdir / "gguf-adapter.safetensors"
    g = np.random.default_rng(1)
    save(adapter, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": g.standard_normal((2, 32)).astype(np.float32),
                   "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": g.standard_normal((8, 2)).astype(np.float32)},
         metadata={"format": "pt"})

    @settings(max_examples=max(50, EXAMPLES // 5), **SETTINGS)
    @given(mutated_gguf())
    def run(data):
        base.write_bytes(data)
        _check_scan_only(base, adapter, outcomes)
        outcomes["examples"] += 1

    run()
    print(f"\nfuzz: {outcomes['examples']} GGUF bases through ddiscan.scan: {dict(outcomes)}")
    record_property("fuzz_gguf_examples", outcomes["examples"])
    assert outcomes["report"] > 0 and len(outcomes) >= 3


def _scheme_cases() -> dict:
    """Valid companions of each integer scheme, from the independent packers of test_intquant."""
    from test_intquant import awq_case, gptq_case
    from ddiscan.io import intquant, mlxquant

    gptq, gptq_meta, _ = gptq_case(np.random.default_rng(0), n_in=32, n_out=16, group=8)
    awq, awq_meta, _ = awq_case(np.random.default_rng(0), n_in=32, n_out=16, group=8)
    words = np.random.default_rng(0).integers(0, 2**32, (16, 4), dtype=np.uint32)
    mlx = {"weight": words, "scales": np.ones((16, 1), np.float32), "biases": np.zeros((16, 1), np.float32)}
    return {"gptq": (intquant.gptq_dequantize, gptq, gptq_meta, (16, 32)),
            "awq": (intquant.awq_dequantize, awq, awq_meta, (16, 32)),
            "mlx": (mlxquant.mlx_dequantize, mlx, {"bits": 4, "group_size": 32}, (16, 32))}


META_VALUES = st.sampled_from([None, -1, 0, 1, 3, 4, 7, 8, 16, 33, 2**40, "4", 4.0, True, "gptq_v2", "gemv"])


@st.composite
def mutated_companions(draw, cases):
    name = draw(st.sampled_from(sorted(cases)))
    fn, arrays, meta, shape = cases[name]
    arrays, meta = dict(arrays), dict(meta)
    role = draw(st.sampled_from(sorted(arrays)))
    kind = draw(st.sampled_from(["drop", "rows", "cols", "dtype", "meta", "values"]))
    a = arrays[role]
    if kind == "drop":
        del arrays[role]
    elif kind == "rows":
        arrays[role] = a[:draw(st.integers(0, max(0, a.shape[0] - 1)))] if draw(st.booleans()) else np.concatenate([a, a[:1]])
    elif kind == "cols" and a.ndim == 2:
        arrays[role] = a[:, :draw(st.integers(0, max(0, a.shape[1] - 1)))]
    elif kind == "dtype":
        with np.errstate(over="ignore"):
            arrays[role] = a.astype(draw(st.sampled_from([np.float32, np.int64, np.uint8, np.float16])))
    elif kind == "meta":
        meta[draw(st.sampled_from(["bits", "group_size", "checkpoint_format", "version", "mode"]))] = draw(META_VALUES)
    elif kind == "values" and a.dtype.kind in "iu":
        arrays[role] = np.full(a.shape, draw(st.sampled_from([-1, 2**31 - 1, 99, 0]))).astype(a.dtype)
    return fn, arrays, meta, shape


def test_fuzz_dequantizer_companions(record_property):
    """Missing, mis-shaped, mistyped companions and odd meta: a one-line QuantizedBase, or a
    W of the weight's shape; never another exception."""
    cases = _scheme_cases()
    outcomes: Counter = Counter()

    @settings(max_examples=max(100, EXAMPLES // 3), **SETTINGS)
    @given(mutated_companions(cases))
    def run(drawn):
        fn, arrays, meta, shape = drawn
        try:
            w = fn(arrays, meta=meta, dtype=np.float32)
        except ddiscan.QuantizedBase as exc:
            assert str(exc) and "\n" not in str(exc)
            outcomes["refused"] += 1
        else:
            assert w.ndim == 2 and w.dtype == np.float32
            outcomes["dequantized"] += 1

    run()
    record_property("fuzz_dequantizer_examples", sum(outcomes.values()))
    assert outcomes["refused"] > 0 and outcomes["dequantized"] > 0


# Quantized bases: a bitsandbytes NF4 checkpoint (double quantization, written by
# bitsandbytes' quantizer and transformers' config) whose stored tensors and quant_state
# are changed: a companion dropped, replaced by an array of another shape or dtype, its
# bytes flipped, the quant_state's JSON given other values, the config's settings changed.
QUANT_EXAMPLES = max(60, EXAMPLES // 10)
QSTEM = "model.layers.0.self_attn.q_proj"
ROLES = ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
         "weight.quant_state.bitsandbytes__nf4"]
ARRAYS = st.builds(lambda shape, dtype: np.zeros(shape, dtype),
                   st.lists(st.integers(0, 40), min_size=1, max_size=2).map(tuple),
                   st.sampled_from([np.uint8, np.int8, np.float16, np.float32, np.int32]))


def _nf4_tensors() -> dict:
    import bitsandbytes.functional as bnb_functional
    import torch

    weight = torch.from_numpy(np.random.default_rng(0).standard_normal((8, 40)).astype(np.float32))
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    stored = {f"{QSTEM}.weight": packed, **{f"{QSTEM}.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    return {k: v.numpy() for k, v in stored.items()}


@st.composite
def quantized_change(draw, tensors: dict, quant_config: dict) -> tuple[dict, dict]:
    tensors, quant_config = dict(tensors), dict(quant_config)
    key = f"{QSTEM}.{draw(st.sampled_from(ROLES))}"
    kind = draw(st.sampled_from(["drop", "replace", "flip", "state", "config"]))
    if kind == "drop":
        tensors.pop(key)
    elif kind == "replace":
        tensors[key] = draw(ARRAYS)
    elif kind == "flip":
        raw = bytearray(tensors[key].tobytes())
        raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
        tensors[key] = np.frombuffer(bytes(raw), tensors[key].dtype).reshape(tensors[key].shape)
    elif kind == "state":
        blob = f"{QSTEM}.weight.quant_state.bitsandbytes__nf4"
        text = draw(json_text(json.loads(tensors[blob].tobytes())))
        tensors[blob] = np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8)
    else:
        quant_config[draw(st.sampled_from(sorted(quant_config) + ["quant_method"]))] = draw(JSON_VALUES)
    return tensors, quant_config


def test_fuzz_quantized_bases(tmp_path, record_property):
    import transformers

    tensors = _nf4_tensors()
    quant_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True).to_dict()
    g = np.random.default_rng(1)
    adapter = save(tmp_path / "adapter.safetensors", {
        f"base_model.model.{QSTEM}.lora_A.weight": g.standard_normal((2, 40)).astype(np.float32),
        f"base_model.model.{QSTEM}.lora_B.weight": g.standard_normal((8, 2)).astype(np.float32)})
    base = tmp_path / "base"
    base.mkdir()
    outcomes: Counter = Counter()

    @settings(max_examples=QUANT_EXAMPLES, **SETTINGS)
    @given(quantized_change(tensors, quant_config))
    def run(change):
        stored, config = change
        save(base / "model.safetensors", stored)
        (base / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": config}))
        _check_scan_only(base, adapter, outcomes)

    run()
    total = sum(outcomes.values())
    print(f"\nfuzz: {total} quantized bases through ddiscan.scan: {dict(outcomes)}")
    record_property("fuzz_quantized_examples", total)
    assert total >= QUANT_EXAMPLES and outcomes["QuantizedBase"] > 0 and outcomes["report"] > 0
