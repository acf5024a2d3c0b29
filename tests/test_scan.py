"""``ddiscan.scan`` end to end through real files, against a dense float64 reference.

Hypothesis builds a base ``.safetensors`` (F64, F32, F16, BF16, F8_E4M3, F8_E5M2 weights)
and a PEFT-style adapter (a directory with ``adapter_config.json``, or a bare file scored
with ``alpha=`` / ``scaling=``). Every quantity the report gives for every module is
compared with SPEC.md §2–3 evaluated densely in float64 on the values *as stored* (each
tensor decoded from its file dtype), sharing no code with ddiscan.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ddiscan

EPS = 1e-6
FIELDS = ("sharpness", "deviation", "magnitude", "magnitude_norm", "ddi", "ddi_raw", "ddi_norm",
          "delta_norm", "base_norm")
DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
ST_NAMES = {v: k for k, v in DTYPES.items()}
KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ---------------------------------------------------------------------------------------
# Files


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write with the safetensors library itself: ``safetensors.numpy.save_file`` writes every
    dtype used here, bfloat16 and both float8 formats included (through ml_dtypes)."""
    safetensors.numpy.save_file(tensors, str(path))
    names = {name: f["dtype"] for name, f in _header(path).items() if name != "__metadata__"}
    assert names == {name: ST_NAMES[a.dtype] for name, a in tensors.items()}


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + size])


def decoded(array: np.ndarray) -> np.ndarray:
    """A stored array's values in float64."""
    return np.asarray(array).astype(np.float64)


def base_values(rng, d, k, decay):
    if decay == "gaussian":
        return rng.standard_normal((d, k))
    n = min(d, k)
    qu, _ = np.linalg.qr(rng.standard_normal((d, n)))
    qv, _ = np.linalg.qr(rng.standard_normal((k, n)))
    sig = 3.0 * 0.8 ** np.arange(n) * (1 + 0.01 * rng.random(n))
    return (qu * sig) @ qv.T


# ---------------------------------------------------------------------------------------
# The reference


def reference(w0, up, down, scale, t):
    delta = scale * (up @ down)
    energy = float(np.sum(delta * delta))
    sigma = np.linalg.svd(delta, compute_uv=False)
    sharp = float(sigma[0] ** 2) / (energy + EPS)
    t = max(1, min(t, *w0.shape))
    left = np.linalg.svd(w0, full_matrices=False)[0][:, :t]
    dev = min(1.0, max(0.0, 1.0 - float(np.sum((left.T @ delta) ** 2)) / (energy + EPS)))
    delta_norm = math.sqrt(energy)
    base_norm = float(np.linalg.norm(w0))
    mag = delta_norm / (base_norm + EPS)
    mag_norm = delta_norm / (base_norm + delta_norm + EPS)
    ddi = sharp * dev * mag_norm
    return dict(sharpness=sharp, deviation=dev, magnitude=mag, magnitude_norm=mag_norm, ddi=ddi,
                ddi_raw=sharp * dev * mag, ddi_norm=ddi / (1 + ddi), delta_norm=delta_norm,
                base_norm=base_norm, t=t)


def assert_matches(module, ref, rel=1e-6):
    for name in FIELDS:
        got, want = getattr(module, name), ref[name]
        abs_ = 1e-10 if name in ("deviation", "ddi", "ddi_raw", "ddi_norm") else 1e-12
        assert abs(got - want) <= rel * abs(want) + abs_, (module.name, name, got, want)


# ---------------------------------------------------------------------------------------
# One generated adapter


@st.composite
def setups(draw, max_dim=48, decays=("gaussian", "decaying")):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(1, 4))
    mode = draw(st.sampled_from(["config", "rslora", "alpha", "scaling"]))
    shared_r = draw(st.integers(1, 8))
    modules = []
    for i in range(n):
        d, k = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
        r = shared_r if mode in ("config", "rslora") else draw(st.integers(1, 8))
        base_dtype = draw(st.sampled_from(sorted(DTYPES)))
        lora_dtype = draw(st.sampled_from(["F32", "F16", "BF16", "F64"]))
        decay = draw(st.sampled_from(decays))
        w0 = base_values(rng, d, k, decay).astype(DTYPES[base_dtype])
        up = (rng.standard_normal((d, r)) * draw(st.sampled_from([0.01, 0.1, 1.0]))).astype(DTYPES[lora_dtype])
        down = (rng.standard_normal((r, k)) / math.sqrt(k)).astype(DTYPES[lora_dtype])
        if draw(st.booleans()) and r > 1:
            up[:, -1] = up[:, 0]  # rank-deficient update
        if draw(st.integers(0, 9)) == 0:
            up[:] = 0  # a zero update
        path = f"model.layers.{i}.{KINDS[i % len(KINDS)]}"
        modules.append(dict(path=path, w0=w0, up=up, down=down, r=r))
    alpha = draw(st.sampled_from([1.0, 8.0, 16.0, 32.0, 0.5]))
    scaling = draw(st.sampled_from([1.0, -1.0, 0.25, 2.0, 1e-4]))
    return dict(modules=modules, mode=mode, alpha=alpha, scaling=scaling)


def materialize(setup, root: Path):
    """Write base and adapter; return (base path, adapter path, scan kwargs, scale per module)."""
    base = root / "base.safetensors"
    write_safetensors(base, {m["path"] + ".weight": m["w0"] for m in setup["modules"]})
    adapter_tensors = {}
    for m in setup["modules"]:
        adapter_tensors[f"base_model.model.{m['path']}.lora_A.weight"] = m["down"]
        adapter_tensors[f"base_model.model.{m['path']}.lora_B.weight"] = m["up"]
    mode, alpha = setup["mode"], setup["alpha"]
    scales = {}
    if mode in ("config", "rslora"):
        adapter = root / "adapter"
        adapter.mkdir()
        write_safetensors(adapter / "adapter_model.safetensors", adapter_tensors)
        r = setup["modules"][0]["r"]
        config = {"r": r, "lora_alpha": alpha, "use_rslora": mode == "rslora"}
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        kwargs = {}
        for m in setup["modules"]:
            scales[m["path"]] = alpha / math.sqrt(r) if mode == "rslora" else alpha / r
    else:
        adapter = root / "lora.safetensors"
        write_safetensors(adapter, adapter_tensors)
        if mode == "alpha":
            kwargs = {"alpha": alpha}
            scales = {m["path"]: alpha / m["r"] for m in setup["modules"]}
        else:
            kwargs = {"scaling": setup["scaling"]}
            scales = {m["path"]: setup["scaling"] for m in setup["modules"]}
    return base, adapter, kwargs, scales


def references(setup, scales, t_of):
    return {
        m["path"]: reference(decoded(m["w0"]), decoded(m["up"]), decoded(m["down"]), scales[m["path"]], t_of(m["r"]))
        for m in setup["modules"]
    }


SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------
# Tests


@SETTINGS
@given(setups())
def test_exact_scan_matches_dense_reference_on_stored_values(setup):
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter, kwargs, scales = materialize(setup, Path(tmp))
        report = ddiscan.scan(base, adapter, exact=True, **kwargs)
    refs = references(setup, scales, lambda r: r)
    assert sorted(m.name for m in report.modules) == sorted(refs)
    for module in report.modules:
        ref = refs[module.name]
        assert module.finite
        assert module.t == ref["t"]
        assert math.isclose(module.scale, scales[module.name], rel_tol=1e-12)
        assert_matches(module, ref)
    ddis = [m.ddi for m in report.modules]
    assert ddis == sorted(ddis, reverse=True)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setups(), st.booleans())
def test_same_inputs_and_options_give_an_identical_report(setup, exact):
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter, kwargs, _ = materialize(setup, Path(tmp))
        first = ddiscan.scan(base, adapter, exact=exact, seed=7, **kwargs).to_json()
        second = ddiscan.scan(base, adapter, exact=exact, seed=7, **kwargs).to_json()
    assert first == second


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setups())
def test_raw_magnitude_makes_ddi_the_raw_index(setup):
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter, kwargs, scales = materialize(setup, Path(tmp))
        report = ddiscan.scan(base, adapter, exact=True, magnitude="raw", **kwargs)
    refs = references(setup, scales, lambda r: r)
    assert report.parameters["magnitude"] == "raw"
    for module in report.modules:
        assert module.ddi == module.ddi_raw
        assert module.ddi_norm == module.ddi / (1 + module.ddi)
        ref = refs[module.name]
        assert abs(module.ddi - ref["ddi_raw"]) <= 1e-6 * ref["ddi_raw"] + 1e-10
    ddis = [m.ddi for m in report.modules]
    assert ddis == sorted(ddis, reverse=True)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setups(), st.sampled_from([2, 1.5, 3]))
def test_t_mult_sets_the_subspace_size(setup, t_mult):
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter, kwargs, scales = materialize(setup, Path(tmp))
        report = ddiscan.scan(base, adapter, exact=True, t_mult=t_mult, **kwargs)
    refs = references(setup, scales, lambda r: math.ceil(t_mult * r))
    by_path = {m["path"]: m for m in setup["modules"]}
    for module in report.modules:
        d, k = by_path[module.name]["w0"].shape
        assert module.t == max(1, min(math.ceil(t_mult * module.r), d, k))
        assert_matches(module, refs[module.name])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["lora_A", "lora_B"])
def test_non_finite_lora_tensor_marks_only_its_module(tmp_path, bad, where):
    rng = np.random.default_rng(3)
    setup = dict(mode="config", alpha=16.0, scaling=1.0, modules=[
        dict(path=f"model.layers.{i}.self_attn.q_proj", w0=rng.standard_normal((24, 20)).astype(np.float32),
             up=(0.1 * rng.standard_normal((24, 4))).astype(np.float32),
             down=rng.standard_normal((4, 20)).astype(np.float32), r=4)
        for i in range(3)
    ])
    poisoned = setup["modules"][1]
    (poisoned["down"] if where == "lora_A" else poisoned["up"])[2, 3] = bad
    base, adapter, kwargs, scales = materialize(setup, tmp_path)
    for exact in (True, False):
        report = ddiscan.scan(base, adapter, exact=exact, **kwargs)
        by_name = {m.name: m for m in report.modules}
        bad_module = by_name["model.layers.1.self_attn.q_proj"]
        assert not bad_module.finite
        assert all(getattr(bad_module, f) is None for f in FIELDS)
        assert report.modules[-1] is bad_module
        assert report.summary["non_finite"] == 1
        assert any("NaN or Inf" in w for w in report.warnings)
        json.loads(report.to_json())  # serialisable: no NaN leaks into the report
        refs = references({"modules": [setup["modules"][0], setup["modules"][2]]}, scales, lambda r: r)
        for name, ref in refs.items():
            assert by_name[name].finite
            if exact:
                assert_matches(by_name[name], ref)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setups(max_dim=96, decays=("decaying",)))
def test_default_randomized_mode_agrees_with_exact_on_decaying_spectra(setup):
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter, kwargs, scales = materialize(setup, Path(tmp))
        fast = {m.name: m for m in ddiscan.scan(base, adapter, **kwargs).modules}
        exact = {m.name: m for m in ddiscan.scan(base, adapter, exact=True, **kwargs).modules}
    assert fast.keys() == exact.keys()
    for name, e in exact.items():
        f = fast[name]
        assert (f.t, f.r, f.d, f.k, f.scale) == (e.t, e.r, e.d, e.k, e.scale)
        assert abs(f.deviation - e.deviation) <= 1e-3, (name, f.deviation, e.deviation)
        for field in ("sharpness", "magnitude", "magnitude_norm", "delta_norm", "base_norm"):
            assert math.isclose(getattr(f, field), getattr(e, field), rel_tol=1e-6, abs_tol=1e-12), field
        assert abs(f.ddi - e.ddi) <= 1e-3 * e.sharpness * e.magnitude_norm + 1e-12
