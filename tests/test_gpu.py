"""The CuPy path on a real GPU: the same numbers as the CPU within float32 rounding.

This module runs only where CuPy is installed (``pip install 'ddiscan[gpu]'``); on the
CPU-only CI the kernels' array-API path is covered by tests/test_spectral.py under
array_api_strict, and the missing-CuPy message by test_cuda_without_cupy_is_a_usage_error.
"""

from pathlib import Path

import pytest
from click.testing import CliRunner

import ddiscan
from ddiscan.cli import cli

ROOT = Path(__file__).resolve().parents[1]
BASE, ADAPTER = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "tiny-lora"


def test_cuda_without_cupy_is_a_usage_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    result = CliRunner().invoke(cli, ["report", str(BASE), str(ADAPTER), "--device", "cuda"])
    assert result.exit_code == 2
    assert result.stderr == "Error: --device cuda needs CuPy: pip install 'ddiscan[gpu]'\n"


def test_gpu_scores_equal_cpu_scores():
    cupy = pytest.importorskip("cupy")
    assert cupy.cuda.runtime.getDeviceCount() > 0, "CuPy is installed but sees no GPU"
    cpu, gpu = ddiscan.scan(BASE, ADAPTER), ddiscan.scan(BASE, ADAPTER, device="cuda")
    assert [m.name for m in cpu.modules] == [m.name for m in gpu.modules]
    for a, b in zip(cpu.modules, gpu.modules):
        for field in ("sharpness", "deviation", "magnitude_norm", "ddi"):
            assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-4, abs=1e-6), (a.name, field)


@pytest.mark.parametrize("options", [
    {},
    {"exact": True},
    {"method": "safelora", "aligned": BASE, "unaligned": ROOT / "fixtures" / "tiny-llama-unaligned.safetensors"},
    {"method": "splora", "aligned": BASE, "unaligned": ROOT / "fixtures" / "tiny-llama-unaligned.safetensors"},
])
def test_the_whole_scan_runs_through_a_strict_array_namespace(monkeypatch, options):
    """What --device cuda does, with array_api_strict standing in for CuPy: every array the
    scan computes with goes through the namespace, and the numbers equal numpy's."""
    import importlib

    import array_api_strict

    scan_module = importlib.import_module("ddiscan.scan")  # the module, not ddiscan.scan the function

    expected = ddiscan.scan(BASE, ADAPTER, **options)
    monkeypatch.setattr(scan_module, "_array_namespace", lambda device: array_api_strict)
    strict = ddiscan.scan(BASE, ADAPTER, **options)
    assert [m.name for m in strict.modules] == [m.name for m in expected.modules]
    for a, b in zip(expected.modules, strict.modules):
        for field in ("sharpness", "deviation", "magnitude", "ddi", "cosine", "ediem"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None) == (y is None), (a.name, field)
            if x is not None:
                assert y == pytest.approx(x, rel=1e-6, abs=1e-9), (a.name, field)
