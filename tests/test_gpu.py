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
