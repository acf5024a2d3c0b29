"""The ddiscan-check hook, run by the real pre-commit tool on a temporary git repository.

The hook is the one .pre-commit-hooks.yaml defines (its ``entry``, ``files`` regex and the
rest), installed as a ``repo: local`` hook with ``language: unsupported`` (``system``
before pre-commit 4.4) instead of ``python``: pre-commit then runs the entry from ``PATH``,
where this virtual environment's ``ddiscan`` comes first and imports the working tree
(``PYTHONPATH``), so what is tested is the code and the hook definition as they are now,
without a clone of HEAD, a network or a pip install. The manifest itself is checked by
``pre-commit validate-manifest``.

Also here: what ``ddiscan check`` does with the files pre-commit hands it that are not
adapters (passed over with a note) and with broken adapters (still blocked).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from safetensors.numpy import load_file

from ddiscan.cli import cli
from safetensors_builders import save, write_peft_dir

ROOT = Path(__file__).resolve().parents[1]
BASE, ADAPTER = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "tiny-lora"
MANIFEST = ROOT / ".pre-commit-hooks.yaml"
PRE_COMMIT = [sys.executable, "-m", "pre_commit"]


def _git(repo, *args, check=True, env=None):
    env = {**(env or os.environ), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=check)


def _language() -> str:
    from pre_commit.all_languages import languages

    return "unsupported" if "unsupported" in languages else "system"


def _config(max_ddi: str) -> str:
    (hook,) = [h for h in yaml.safe_load(MANIFEST.read_text()) if h["id"] == "ddiscan-check"]
    local = {**hook, "language": _language(), "verbose": True, "args": ["--base", str(BASE), "--max-ddi", max_ddi]}
    return yaml.safe_dump({"repos": [{"repo": "local", "hooks": [local]}]}, sort_keys=False)


def mlx_adapter(directory: Path) -> Path:
    """An MLX LoRA adapter as mlx-lm saves one (mlx_lm/tuner/lora.py's LoRALinear holds
    ``lora_a`` (k × r) and ``lora_b`` (r × d); adapters.safetensors beside an
    adapter_config.json with ``fine_tune_type`` and ``lora_parameters``)."""
    g = np.random.default_rng(0)
    save(directory / "adapters.safetensors", {
        "model.layers.0.self_attn.q_proj.lora_a": g.standard_normal((64, 4)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.lora_b": np.zeros((4, 64), np.float32),
    })
    (directory / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0}}))
    return directory


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("adapters")
    _git(repo, "init", "-q")
    (repo / ".pre-commit-config.yaml").write_text(_config("0.02"))
    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp_path_factory.mktemp("pre-commit-home")),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([*PRE_COMMIT, "install"], cwd=repo, env=env, check=True, capture_output=True)
    _git(repo, "add", ".pre-commit-config.yaml")
    _git(repo, "commit", "-q", "-m", "config", "--no-verify")
    return repo, env


def _commit(repo, env, message):
    result = _git(repo, "commit", "-m", message, check=False, env=env)
    return result.returncode, result.stdout + result.stderr


def test_the_manifest_is_valid():
    result = subprocess.run([*PRE_COMMIT, "validate-manifest", str(MANIFEST)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readmes_local_hook_is_the_manifests():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in readme.split("```yaml\n")[1:]]
    (local,) = [yaml.safe_load(b)["repos"][0]["hooks"][0] for b in blocks if "repo: local" in b]
    (hook,) = yaml.safe_load(MANIFEST.read_text())
    for key in ("id", "name", "entry", "files", "require_serial"):
        assert local[key] == hook[key], key
    assert local["language"] == "unsupported"


def test_high_ddi_adapter_is_blocked_and_clean_one_passes(repo):
    repo, env = repo
    shutil.copytree(ADAPTER, repo / "risky")
    _git(repo, "add", "risky")
    code, output = _commit(repo, env, "add a risky adapter")
    assert code != 0, output
    assert "ddiscan check" in output and "Failed" in output
    assert "risky/adapter_model.safetensors:1: model.layers.1.self_attn.v_proj: DDI 0.0365185 > 0.02" in output
    assert _git(repo, "log", "--oneline").stdout.count("\n") == 1  # nothing committed

    _git(repo, "rm", "-r", "-q", "--cached", "risky")
    shutil.rmtree(repo / "risky")
    shutil.copytree(ADAPTER, repo / "clean")
    (repo / ".pre-commit-config.yaml").write_text(_config("0.05"))
    _git(repo, "add", "clean", ".pre-commit-config.yaml")
    code, output = _commit(repo, env, "add a clean adapter")
    assert code == 0, output
    assert "ddiscan check" in output and "Passed" in output


def test_files_that_are_not_adapters_pass_with_a_note_and_an_mlx_adapter_is_checked(repo):
    repo, env = repo
    shutil.copytree(BASE, repo / "base")  # a sharded base: two .safetensors files
    mlx_adapter(repo / "mlx")
    _git(repo, "add", "base", "mlx")
    code, output = _commit(repo, env, "add a base and an MLX adapter")
    assert code == 0, output
    assert "Passed" in output
    for name in ("base/model-00001-of-00002.safetensors", "base/model-00002-of-00002.safetensors"):
        assert f"note: {name}: not a LoRA adapter (no LoRA key in its header, not in a PEFT directory); passed over" \
            in output
    assert "note: mlx/" not in output  # the MLX adapter (ΔW = 0: lora_b is zeros) is checked, and passes
    assert "ddiscan check: 1 adapter(s), 1 modules: all pass" in output


# ---------------------------------------------------------------------------------------
# ddiscan check on the files pre-commit passes


def _check(*paths, quiet=False):
    args = ["check", "--base", str(BASE), "--max-ddi", "0.05", *(["-q"] if quiet else []), *map(str, paths)]
    return CliRunner().invoke(cli, args)


def test_check_passes_over_non_adapters_and_gates_the_adapters_beside_them(tmp_path):
    mlx = mlx_adapter(tmp_path / "mlx")
    shard = BASE / "model-00001-of-00002.safetensors"
    result = _check(shard, mlx / "adapters.safetensors", mlx / "adapter_config.json",
                    ADAPTER / "adapter_config.json", ADAPTER / "adapter_model.safetensors")
    assert result.exit_code == 0, result.output
    assert f"note: {shard}: not a LoRA adapter" in result.stderr
    assert "ddiscan check: 2 adapter(s), 9 modules: all pass" in result.stderr  # the PEFT and the MLX adapter
    only = _check(shard)
    assert only.exit_code == 0 and "0 adapter(s)" in only.stderr and "passed over" in only.stderr
    assert _check(shard, quiet=True).stderr == ""
    strict = CliRunner().invoke(cli, ["check", "--base", str(BASE), "--max-ddi", "0.02", str(shard), str(ADAPTER)])
    assert strict.exit_code == 1 and "v_proj: DDI" in strict.stdout


def test_broken_adapters_are_still_blocked(tmp_path):
    tensors = load_file(ADAPTER / "adapter_model.safetensors")
    only_a = {k: v for k, v in tensors.items() if ".lora_A." in k}
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    # a PEFT file with only lora_A factors, with and without its config
    half = write_peft_dir(tmp_path / "half", only_a, config)
    loose = save(tmp_path / "loose" / "lora.safetensors", only_a)
    # a PEFT directory whose weights hold no LoRA key at all (a prompt-tuning adapter)
    prompt = write_peft_dir(tmp_path / "prompt", {"prompt_embeddings": np.ones((4, 64), np.float32)},
                            {"peft_type": "PROMPT_TUNING", "base_model_name_or_path": str(BASE)})
    # a kohya file with a LyCORIS (LoHa) tensor: an adapter ddiscan cannot score
    loha = save(tmp_path / "loha.safetensors", {"lora_unet_x_proj.hada_w1_a": np.ones((4, 4), np.float32)})
    # not a safetensors file at all
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    for path in (half / "adapter_model.safetensors", half / "adapter_config.json", loose,
                 prompt / "adapter_model.safetensors", prompt / "adapter_config.json", loha, junk):
        result = _check(path)
        assert result.exit_code == 3, (path, result.output)
        (line,) = result.stderr.splitlines()
        assert line.startswith("Error: ") and "passed over" not in result.stderr


def test_an_mlx_adapter_is_scored(tmp_path):
    mlx = mlx_adapter(tmp_path / "mlx")
    result = CliRunner().invoke(cli, ["report", str(BASE), str(mlx / "adapters.safetensors"), "--format", "json"])
    assert result.exit_code == 0, result.output
    (module,) = json.loads(result.stdout)["modules"]
    assert module["name"] == "model.layers.0.self_attn.q_proj" and module["scale"] == 20.0 and module["ddi"] == 0.0
