"""ddiscan.io.adapterdir: an existing output directory is replaced only with force, and only
when ddiscan wrote it; the refusals name the parameter, and a path's braces stay as they are."""

import shutil
from pathlib import Path

import pytest

from ddiscan.lora import load_adapter
from ddiscan.options import OptionError
from ddiscan.rewrite import rewrite_adapter

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "fixtures" / "tiny-lora"
PRUNED = ["model.layers.0.self_attn.q_proj"]


def _refusal(output, force) -> OptionError:
    with pytest.raises(OptionError) as info:
        rewrite_adapter(load_adapter(ADAPTER), PRUNED, output, force=force)
    return info.value


def test_an_existing_output_needs_force(tmp_path):
    out = tmp_path / "out{mode}"
    out.mkdir()
    error = _refusal(out, force=False)
    assert str(error) == f"{out}: exists (use force to replace it)"
    assert error.render({"force": "--force"}) == f"{out}: exists (use --force to replace it)"


def test_force_replaces_only_what_ddiscan_wrote(tmp_path):
    out = tmp_path / "out"
    shutil.copytree(ADAPTER, out)
    error = _refusal(out, force=True)
    assert str(error) == (
        f"{out}: exists and is not an output of ddiscan prune (no adapter_model.safetensors with ddiscan's list "
        "of the files it wrote); force replaces only an adapter directory ddiscan wrote (choose another output)"
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ADAPTER.iterdir())
