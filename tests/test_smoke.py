"""The bundled example scans end to end, through the library and the command line."""

from pathlib import Path

from click.testing import CliRunner

import ddiscan
from ddiscan.cli import cli

ROOT = Path(__file__).resolve().parents[1]
BASE, ADAPTER = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "tiny-lora"


def test_fixture_ranks_the_planted_modules():
    report = ddiscan.scan(BASE, ADAPTER)
    names = [m.name for m in report.modules]
    assert len(names) == 8
    assert names[0] == "model.layers.1.self_attn.v_proj"
    assert names[-1] == "model.layers.0.self_attn.q_proj"


def test_cli_table_lists_every_module():
    result = CliRunner().invoke(cli, ["report", str(BASE), str(ADAPTER)], catch_exceptions=False)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split()[:2] == ["rank", "module"]
    assert lines[1].split()[1] == "model.layers.1.self_attn.v_proj"
    assert lines[-1].startswith("8 modules; DDI min")


def test_the_fixture_script_writes_the_committed_bytes(tmp_path):
    """fixtures/ is generated, never edited: the script reproduces every file, byte for byte."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "fixtures" / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(ROOT / "fixtures") for p in (ROOT / "fixtures").rglob("*")
                       if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts)
    assert written == committed
    for name in written:
        assert (tmp_path / name).read_bytes() == (ROOT / "fixtures" / name).read_bytes(), name


def test_the_report_records_the_threads_blas_used():
    from threadpoolctl import threadpool_info

    blas = max(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")
    assert ddiscan.scan(BASE, ADAPTER).parameters["threads"] == blas
    assert ddiscan.scan(BASE, ADAPTER, threads=1).parameters["threads"] == 1


def test_start_up_imports_only_what_every_command_needs():
    """`ddiscan --version`, `--help` and every command's start pay for numpy, click and tqdm
    only: the optional and heavy packages are imported by the code path that needs them."""
    import subprocess
    import sys

    code = ("import sys, ddiscan.cli; heavy = [m for m in ('ml_dtypes', 'scipy', 'matplotlib', 'huggingface_hub', "
            "'threadpoolctl', 'torch', 'cupy', 'array_api_compat', 'safetensors', 'dask', 'distributed') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_package_exports_what_a_python_user_needs_and_not_the_matching_internals():
    from ddiscan import errors

    needed = {"scan", "scan_many", "prune", "check", "select", "find_base", "build_profile", "Report", "Selection",
              "PruneResult", "ScanOptions"}
    error_classes = {name for name in errors.__all__ if isinstance(getattr(errors, name), type)}
    assert needed | error_classes <= set(ddiscan.__all__)
    assert all(hasattr(ddiscan, name) for name in ddiscan.__all__)
    assert not {"match_modules", "LoraModule", "load_adapter"} & set(ddiscan.__all__)
    assert callable(ddiscan.check) and ddiscan.check.__module__ == "ddiscan.check"
