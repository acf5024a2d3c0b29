"""ddiscan.rewrite: refusals name the library's parameters (the CLI shows them as flags)."""

from pathlib import Path

import pytest

from ddiscan.lora import load_adapter, module_keys
from ddiscan.options import OptionError
from ddiscan.rewrite import rewrite_adapter

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "fixtures" / "tiny-lora"
FLAGS = {"mode": "--mode", "force": "--force"}


def _refusal(tmp_path, *args, **kwargs) -> OptionError:
    with pytest.raises(OptionError) as info:
        rewrite_adapter(load_adapter(ADAPTER), *args, **kwargs)
    assert list(tmp_path.iterdir()) == []
    return info.value


def test_an_unknown_mode_names_the_parameter(tmp_path):
    error = _refusal(tmp_path, [], tmp_path / "out", mode="bogus")
    assert str(error) == "mode must be one of zero, drop, project"
    assert error.render(FLAGS) == "--mode must be one of zero, drop, project"


def test_dropping_every_module_names_the_parameter(tmp_path):
    names = list(module_keys(load_adapter(ADAPTER).file))
    error = _refusal(tmp_path, names, tmp_path / "out", mode="drop")
    assert str(error) == "mode drop would remove every LoRA module; use mode zero"
    assert error.render(FLAGS) == "--mode drop would remove every LoRA module; use --mode zero"


def test_projecting_without_the_projected_factor_names_the_parameter(tmp_path):
    name = "model.layers.0.self_attn.q_proj"
    error = _refusal(tmp_path, [name], tmp_path / "out", mode="project")
    assert str(error) == f"{name}: mode project needs the projected factor of this module"
    assert error.render(FLAGS) == f"{name}: --mode project needs the projected factor of this module"
