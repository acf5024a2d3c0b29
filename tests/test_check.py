"""ddiscan.check: the library's check, which ``ddiscan check`` prints."""

import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import ddiscan
from ddiscan.check import Failure, adapter_of
from ddiscan.cli import cli
from safetensors_builders import save

ROOT = Path(__file__).resolve().parents[1]
BASE, ADAPTER = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "tiny-lora"
UNALIGNED = ROOT / "fixtures" / "tiny-llama-unaligned.safetensors"


def test_check_returns_the_reports_and_each_module_over_the_limit():
    result = ddiscan.check([ADAPTER], base=BASE, max_ddi=0.02)
    (report,) = result.reports
    over = [m for m in report.modules if m.ddi > 0.02]
    assert [f.module for f in result.failures] == [m.name for m in over] == ["model.layers.1.self_attn.v_proj"]
    (failure,) = result.failures
    assert failure.label == "DDI" and failure.above and failure.limit == 0.02
    assert failure.value == pytest.approx(over[0].ddi, rel=1e-12)
    assert failure.file == report.inputs["adapter"]["file"]
    assert not result.passed and result.modules == 8 and result.notes == []
    assert ddiscan.check([ADAPTER], base=BASE, max_ddi=1.0).passed


def test_check_prints_what_the_library_returns():
    result = ddiscan.check([ADAPTER], base=BASE, max_ddi=0.02, max_ddi_norm=0.009)
    shown = CliRunner().invoke(cli, ["check", "--base", str(BASE), "--max-ddi", "0.02", "--max-ddi-norm", "0.009",
                                     str(ADAPTER)])
    assert shown.exit_code == 1
    assert shown.stdout.splitlines() == [str(f) for f in result.failures]
    assert len(result.failures) == 3  # v_proj over both limits, k_proj over DDI_norm
    assert shown.stderr == "ddiscan check: 1 adapter(s), 8 modules: 3 failing\n"


def test_a_lower_limit_fails_a_module_below_it():
    result = ddiscan.check([ADAPTER], base=BASE, min_cosine=2.0, method="safelora", aligned=BASE,
                           unaligned=UNALIGNED)
    assert len(result.failures) == 8 and all(not f.above and f.label == "cosine" for f in result.failures)
    assert all(str(f).endswith(" < 2") for f in result.failures)


def test_a_score_that_is_not_finite_fails_every_limit_on_it():
    failure = Failure("a.safetensors", "m", "DDI", None, 0.5, True)
    assert str(failure) == "a.safetensors:1: m: DDI not finite > 0.5"


@pytest.mark.parametrize("method, extra, message", [
    ("ddi", {}, "give max_ddi and/or max_ddi_norm"),
    ("splora", {"aligned": BASE, "unaligned": UNALIGNED}, "give max_ediem"),
])
def test_check_needs_a_limit_of_its_method(method, extra, message):
    with pytest.raises(ddiscan.OptionError) as info:
        ddiscan.check([ADAPTER], base=BASE, method=method, max_ddi=None if method == "ddi" else 1.0, **extra)
    assert str(info.value) == message


def test_a_bad_scan_option_is_refused_before_anything_is_read(tmp_path):
    with pytest.raises(ddiscan.OptionError) as info:
        ddiscan.check([tmp_path / "missing"], max_ddi=1.0, t=2, t_mult=2.0)
    assert str(info.value) == "give t or t_mult, not both"


def test_files_that_are_not_adapters_are_passed_over_with_a_note(tmp_path):
    base_file = save(tmp_path / "model.safetensors", {"w.weight": np.ones((4, 4), np.float32)})
    config = tmp_path / "lonely" / "adapter_config.json"
    config.parent.mkdir()
    config.write_text("{}")
    result = ddiscan.check([base_file, str(config)], max_ddi=1.0)
    assert result.reports == [] and result.failures == [] and result.passed
    assert result.notes == [
        f"{base_file}: not a LoRA adapter (no LoRA key in its header, not in a PEFT directory); passed over",
        f"{config}: no adapter_model.safetensors beside it, not a PEFT adapter; passed over",
    ]


def test_a_peft_file_or_its_config_is_its_directory():
    assert adapter_of(str(ADAPTER / "adapter_config.json")) == (str(ADAPTER), None)
    assert adapter_of(str(ADAPTER / "adapter_model.safetensors")) == (str(ADAPTER), None)


def test_a_profile_base_is_noted_with_its_digest(tmp_path):
    profile = tmp_path / "base.ddiprofile"
    ddiscan.build_profile(BASE, profile, max_t=8)
    result = ddiscan.check([ADAPTER], base=profile, max_ddi=1.0)
    digest = ddiscan.Profile(profile).sha256
    (note,) = result.notes
    assert note.startswith(f"{profile}: profile sha256 {digest}, made from ")
    with pytest.raises(ddiscan.OptionError) as info:
        ddiscan.check([ADAPTER], base=BASE, max_ddi=1.0, profile_sha256="0" * 64)
    assert str(info.value) == f"profile_sha256 pins a base profile; {BASE} is not a .ddiprofile file"
    scores = {m.name: m.ddi for m in ddiscan.check([ADAPTER], base=BASE, max_ddi=1.0).reports[0].modules}
    assert all(math.isclose(m.ddi, scores[m.name], rel_tol=1e-3) for m in result.reports[0].modules)
