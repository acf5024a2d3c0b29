"""The ddiscan-check hook, run by the real pre-commit tool on a temporary git repository.

pre-commit clones this repository at HEAD, installs it in its own virtual environment
(from PyPI and pip's cache, as for any user) and runs the hook that .pre-commit-hooks.yaml
defines: a commit adding a high-DDI adapter is blocked, a clean one passes.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE, ADAPTER = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "tiny-lora"


def _git(repo, *args, check=True):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    rev = _git(ROOT, "rev-parse", "HEAD").stdout.strip()
    assert _git(ROOT, "cat-file", "-e", f"{rev}:.pre-commit-hooks.yaml", check=False).returncode == 0, \
        "commit .pre-commit-hooks.yaml first: pre-commit installs the hook from HEAD"
    repo = tmp_path_factory.mktemp("adapters")
    _git(repo, "init", "-q")
    (repo / ".pre-commit-config.yaml").write_text(
        "repos:\n"
        f"  - repo: {ROOT}\n"
        f"    rev: {rev}\n"
        "    hooks:\n"
        "      - id: ddiscan-check\n"
        f"        args: [--base, {BASE}, --max-ddi, '0.02']\n"
    )
    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp_path_factory.mktemp("pre-commit-home"))}
    pre_commit = [sys.executable, "-m", "pre_commit"]
    subprocess.run([*pre_commit, "install"], cwd=repo, env=env, check=True, capture_output=True)
    _git(repo, "add", ".pre-commit-config.yaml")
    _git(repo, "commit", "-q", "-m", "config", "--no-verify")
    os.environ["PRE_COMMIT_HOME"] = env["PRE_COMMIT_HOME"]
    yield repo
    os.environ.pop("PRE_COMMIT_HOME", None)


def test_high_ddi_adapter_is_blocked_and_clean_one_passes(repo):
    shutil.copytree(ADAPTER, repo / "risky")
    _git(repo, "add", "risky")
    blocked = _git(repo, "commit", "-m", "add a risky adapter", check=False)
    assert blocked.returncode != 0, blocked.stdout + blocked.stderr
    output = blocked.stdout + blocked.stderr
    assert "ddiscan check" in output and "Failed" in output
    assert "risky/adapter_model.safetensors:1: model.layers.1.self_attn.v_proj: DDI 0.0365185 > 0.02" in output
    assert _git(repo, "log", "--oneline").stdout.count("\n") == 1  # nothing committed

    _git(repo, "rm", "-r", "-q", "--cached", "risky")
    shutil.rmtree(repo / "risky")
    shutil.copytree(ADAPTER, repo / "clean")
    config = (repo / ".pre-commit-config.yaml").read_text().replace("'0.02'", "'0.05'")
    (repo / ".pre-commit-config.yaml").write_text(config)
    _git(repo, "add", "clean", ".pre-commit-config.yaml")
    passed = _git(repo, "commit", "-m", "add a clean adapter", check=False)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    output = passed.stdout + passed.stderr
    assert "ddiscan check" in output and "Passed" in output
