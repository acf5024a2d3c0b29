"""Scans against a base profile carry the error bar of O that scans against the base carry
(SPEC.md §2): the same gap and deviation_error at t = max_t, an error bar that holds for a
smaller t and for the right basis (transposed weights), and version 1 profiles, which store
no Ritz values, still scored as before."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import ddiscan
from ddiscan.cli import cli
from ddiscan.profile import Profile, build_profile
from ddiscan.profile_ritz import SIDES, packed, unpacked
from ddiscan.sketch import Sketch, dominant_subspace
from safetensors_builders import peft_config, save, write_peft_dir
from test_hostile_gate import _forge
from test_krylov import flat, straddling, with_spectrum

ROOT = Path(__file__).resolve().parents[1]
BASE, ADAPTER = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "tiny-lora"
SCORES = ("sharpness", "deviation", "magnitude", "ddi", "delta_norm", "base_norm")


@pytest.mark.parametrize("sketch", [{"sketch": "krylov"}, {"sketch": "subspace"}, {"exact": True}])
def test_a_profile_has_the_gap_and_error_bar_of_a_scan_of_the_base(tmp_path, sketch):
    prof = tmp_path / "tiny.ddiprofile"
    build_profile(BASE, prof, max_t=4, **sketch)  # the fixture adapter has r = 4: t = max_t
    via_profile, via_base = ddiscan.scan(prof, ADAPTER, **sketch), ddiscan.scan(BASE, ADAPTER, **sketch)
    assert via_profile.warnings == []
    for x, y in zip(via_profile.modules, via_base.modules, strict=True):
        assert x.name == y.name and x.gap is not None and x.deviation_error is not None
        assert x.gap == pytest.approx(y.gap, rel=1e-6)
        assert x.deviation_error == pytest.approx(y.deviation_error, rel=1e-6, abs=1e-12)
    if sketch.get("exact"):
        assert all(m.deviation_error == 0.0 for m in via_profile.modules)


@settings(derandomize=True, max_examples=30, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 8), st.integers(0, 3), st.integers(0, 2),
       st.sampled_from(["krylov", "subspace"]), st.sampled_from(SIDES))
def test_what_a_profile_stores_gives_the_error_bar_of_every_t(seed, t, oversample, iters, kernel, side):
    """packed → unpacked keeps Ritz.error_bar for every j ≤ t and either side, whichever side
    the kernel iterated on, with m = t (nothing seen beyond), m = t + 1 and m > t + 1."""
    w0 = with_spectrum(seed, 20, 12, flat(12, t, 1.3, 0.9)).astype(np.float32)
    sketch = Sketch(seed=seed % 3, oversample=oversample, kernel=kernel, krylov_iters=iters, power_iters=iters)
    ritz, _ = dominant_subspace(w0, t=t, sketch=sketch, xp=np, right=True)
    ritz = dataclasses.replace(ritz, side=side)
    stored = packed(ritz, t)
    assert stored["ritz_info"].tolist() == [ritz.values.size, int(ritz.complete), SIDES.index(side)]
    again = unpacked(stored["ritz"], stored["residuals"], stored["ritz_info"])
    for j in range(1, t + 1):
        for asked in SIDES:
            gap, error = again.error_bar(j, side=asked)
            want_gap, want_error = ritz.error_bar(j, side=asked)
            assert (gap is None) == (want_gap is None) and error == pytest.approx(want_error, rel=1e-12, abs=0)
            assert gap is None or gap == pytest.approx(want_gap, rel=1e-12)


# one weight with a controlled gap, as a LLaMA q_proj (stored d × k) or a GPT-2 c_attn
# (Conv1D, stored k × d: scored with the profile's right basis)
LAYOUTS = {"linear": ("model.layers.0.self_attn.q_proj", False), "conv1d": ("h.0.attn.c_attn", True)}


def _pair(tmp_path: Path, w0: np.ndarray, up: np.ndarray, down: np.ndarray, layout: str) -> tuple[Path, Path]:
    """(base file, PEFT adapter directory) for W0 (d × k as the module sees it) and ΔW = up · down."""
    name, transposed = LAYOUTS[layout]
    stored = (w0.T if transposed else w0).astype(np.float32)
    base = save(tmp_path / "base.safetensors", {f"{name}.weight": np.ascontiguousarray(stored)})
    prefix = "base_model.model." + ("transformer." if transposed else "")
    tensors = {f"{prefix}{name}.lora_A.weight": down.astype(np.float32),
               f"{prefix}{name}.lora_B.weight": up.astype(np.float32)}
    config = peft_config(up.shape[1], up.shape[1], fan_in_fan_out=transposed,
                         target_modules=["c_attn"] if transposed else ["q_proj"])
    return base, write_peft_dir(tmp_path / "adapter", tensors, config)


@settings(derandomize=True, max_examples=24, deadline=None)
@given(st.integers(0, 2**31), st.integers(4, 10), st.integers(1, 10), st.floats(1.05, 2.0),
       st.sampled_from(["krylov", "subspace"]), st.sampled_from(sorted(LAYOUTS)))
def test_the_error_bar_of_a_profile_holds_for_every_t_it_stores(tmp_path_factory, seed, max_t, r, gap, kernel,
                                                                 layout):
    """For t = r ≤ max_t (the leading columns of the profile's wider sketch), and for the
    right basis, |O − O_exact| (float64 SVD) stays within the profile scan's error bar."""
    r = min(r, max_t)
    d, k = 72, 48
    w0 = with_spectrum(seed, d, k, flat(k, r, gap, 0.98))
    u = np.linalg.svd(w0)[0]
    up, down = straddling(np.random.default_rng(seed), u, r, r, k)
    tmp_path = tmp_path_factory.mktemp("case")
    base, adapter = _pair(tmp_path, w0, up, down, layout)
    prof = tmp_path / "base.ddiprofile"
    build_profile(base, prof, max_t=max_t, sketch=kernel, krylov_iters=2, power_iters=2, seed=seed % 5)
    (module,) = ddiscan.scan(prof, adapter, scaling=1.0).modules
    (exact,) = ddiscan.scan(base, adapter, scaling=1.0, exact=True).modules
    assert module.transposed is LAYOUTS[layout][1] and module.t == r
    assert 0.0 <= module.deviation_error <= 1.0 and (module.gap is None or module.gap >= 1.0 - 1e-9)
    assert abs(module.deviation - exact.deviation) <= module.deviation_error + 1e-6


def test_a_profile_error_bar_is_informative_where_the_gap_is_wide(tmp_path):
    """Not a vacuous 1: with a wide gap at t the bar is small, and smaller than at max_t."""
    w0 = with_spectrum(3, 72, 48, flat(48, 3, 3.0, 0.98))
    up, down = straddling(np.random.default_rng(3), np.linalg.svd(w0)[0], 3, 3, 48)
    base, adapter = _pair(tmp_path, w0, up, down, "conv1d")
    prof = tmp_path / "base.ddiprofile"
    build_profile(base, prof, max_t=8, krylov_iters=2)
    (module,) = ddiscan.scan(prof, adapter, scaling=1.0).modules
    assert module.deviation_error < 1e-3 and module.gap == pytest.approx(3.0, rel=0.05)
    stored = Profile(prof)
    assert stored.error_bar("h.0.attn.c_attn.weight", transposed=True, t=3)[1] == module.deviation_error
    assert stored.error_bar("h.0.attn.c_attn.weight", transposed=False, t=3)[1] <= module.deviation_error


def test_a_profile_of_real_gpt2_weights_bounds_o_of_peft_conv1d_adapters(tmp_path):
    """transformers' GPT-2 (Conv1D weights, stored in × out) and a PEFT-trained adapter with
    fan_in_fan_out: t = 4 < max_t = 8, right bases, every error bar holds against exact."""
    from peft import LoraConfig
    from test_real_peft import save_pair, tiny_gpt2, train_causal_lm

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                        init_lora_weights=False)
    base, adapter, _ = save_pair(tmp_path, tiny_gpt2(seed=3), config,
                                 train=lambda model: train_causal_lm(model, vocab=100, steps=2))
    prof = tmp_path / "gpt2.ddiprofile"
    build_profile(base, prof, max_t=8, oversample=2, krylov_iters=1)
    scanned = ddiscan.scan(prof, adapter).modules
    exact = {m.name: m.deviation for m in ddiscan.scan(base, adapter, exact=True).modules}
    assert len(scanned) == 8 and all(m.transposed and m.t == 4 for m in scanned)
    for m in scanned:
        assert m.deviation_error is not None and m.gap is not None
        assert abs(m.deviation - exact[m.name]) <= m.deviation_error + 1e-6, m.name
    assert any(m.deviation_error < 0.5 for m in scanned)


def _version_1(data):
    """A version 2 profile's tensors as version 1 wrote them: no Ritz values."""
    for name in [n for n in data if n.rsplit(":", 1)[1] in ("ritz", "residuals", "ritz_info")]:
        del data[name]


def test_a_version_1_profile_scores_as_before_without_error_bars(tmp_path):
    prof = tmp_path / "tiny.ddiprofile"
    build_profile(BASE, prof, max_t=4)
    old = _forge(prof, tmp_path / "old.ddiprofile", meta=lambda meta: meta.update(version=1), tensors=_version_1)
    new, legacy = ddiscan.scan(prof, ADAPTER), ddiscan.scan(old, ADAPTER)
    for x, y in zip(legacy.modules, new.modules, strict=True):
        assert x.name == y.name and x.gap is None and x.deviation_error is None
        for field in SCORES:
            assert getattr(x, field) == pytest.approx(getattr(y, field), rel=1e-12), (x.name, field)
    (warning,) = [w for w in legacy.warnings if "error bar" in w]
    assert "rebuild it with `ddiscan profile`" in warning and len(legacy.warnings) == 1
    result = CliRunner().invoke(cli, ["report", str(old), str(ADAPTER)])
    assert result.exit_code == 0 and result.stderr.count("no error bars") == 1


def test_report_and_prune_warn_where_a_blind_profile_cannot_rank(tmp_path):
    """A profile sketched with no oversampling and no iterations stores t columns and nothing
    beyond: every error bar is 1, and report and prune say so as they do against the base."""
    prof = tmp_path / "blind.ddiprofile"
    build_profile(BASE, prof, max_t=4, sketch="subspace", power_iters=0, oversample=0)
    report = CliRunner().invoke(cli, ["report", str(prof), str(ADAPTER)])
    assert report.exit_code == 0, report.output
    assert "O is not precise enough to rank them" in report.stderr and "--exact" in report.stderr
    assert all(row.split()[0].endswith("?") for row in report.stdout.splitlines()[1:-1])
    prune = CliRunner().invoke(cli, ["prune", str(prof), str(ADAPTER), "--top", "2", "--dry-run"])
    assert prune.exit_code == 0 and "could change within the error bars of O" in prune.stderr
    wide = tmp_path / "wide.ddiprofile"
    build_profile(BASE, wide, max_t=8)
    settled = CliRunner().invoke(cli, ["prune", str(wide), str(ADAPTER), "--top", "2", "--dry-run"])
    assert settled.exit_code == 0 and "could change" not in settled.stderr
