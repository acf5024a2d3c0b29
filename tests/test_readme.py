"""Every ddiscan command README.md shows is run here, and the output it shows is real."""

import math
import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from ddiscan.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PLACEHOLDERS = {"BASE": "fixtures/tiny-llama", "ADAPTER": "fixtures/tiny-lora",
                "ADAPTER1": "fixtures/tiny-lora", "ADAPTER2": "second-lora"}


def _commands() -> list[str]:
    """ddiscan command lines from README's code blocks (indented or fenced)."""
    commands, fenced = [], False
    for line in README.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        code = line[4:] if line.startswith("    ") else line if fenced else None
        if code is None:
            continue
        code = code.split(" && ")[-1].split("  #")[0].strip()
        if code.startswith("ddiscan "):
            commands.append(code)
    return commands


COMMANDS = _commands()


def test_the_readme_shows_every_command():
    shown = {c.split()[1] for c in COMMANDS}
    assert shown == set(cli.commands), shown
    assert len(COMMANDS) >= 10


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory as a user's: the fixtures, a second adapter, and adapter files at top level."""
    work = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "fixtures", work / "fixtures")
    shutil.copytree(ROOT / "fixtures" / "tiny-lora", work / "second-lora")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(ROOT / "fixtures" / "tiny-lora" / name, work / name)
    return work


def test_every_readme_command_runs(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    runner = CliRunner()
    for command in COMMANDS:
        args = [PLACEHOLDERS.get(word, word) for word in shlex.split(command)[1:]
                if word not in ("[options]", "...")]
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, (command, result.output)
        assert "Traceback" not in result.output


NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def same_output(shown: str, printed: str, *, rel: float = 1e-5) -> bool:
    """Text equal exactly, and every number equal within ``rel`` (BLAS builds differ in the
    last digits they print); the column layout may shift by the width of a number."""
    shown_numbers, printed_numbers = NUMBER.findall(shown), NUMBER.findall(printed)
    if NUMBER.sub("#", shown).split() != NUMBER.sub("#", printed).split():
        return False
    if len(shown_numbers) != len(printed_numbers):
        return False
    return all(math.isclose(float(a), float(b), rel_tol=rel, abs_tol=0.0)
               for a, b in zip(shown_numbers, printed_numbers))


@pytest.mark.parametrize("shown, printed, same", [
    ("DDI 1.67528e-05 max 0.0365185\n", "DDI 1.67529e-05 max 0.0365185\n", True),
    ("O  0.00344391  x\n", "O  0.00344392  x\n", True),
    ("DDI 1.67528e-05\n", "DDI 1.67628e-05\n", False),
    ("8 modules\n", "9 modules\n", False),
    ("rank 1 q_proj\n", "rank 1 k_proj\n", False),
    ("a 1 b\n", "a 1 b 2\n", False),
])
def test_same_output_tolerates_only_last_digit_noise(shown, printed, same):
    assert same_output(shown, printed) is same


def test_the_outputs_readme_shows_are_what_ddiscan_prints(monkeypatch):
    monkeypatch.chdir(ROOT)
    shown = re.findall(r"^    (ddiscan [^\n]+)\n\n```text\n(.*?)```", README, flags=re.M | re.S)
    assert len(shown) >= 2
    for command, output in shown:
        result = CliRunner().invoke(cli, shlex.split(command)[1:])
        assert result.exit_code == 0, (command, result.output)
        assert same_output(output, result.stdout), (command, result.stdout)


def test_the_python_examples_run(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    blocks = re.findall(r"^```python\n(.*?)```", README, flags=re.M | re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    assert "model.layers.1.self_attn.v_proj" in capsys.readouterr().out


def test_the_python_examples_print_what_the_readme_shows(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    shown = re.findall(r"^```python\n((?:(?!```).)*)```\n\nprints\n\n```text\n((?:(?!```).)*)```", README, flags=re.M | re.S)
    assert shown  # "Quantized bases"
    for code, output in shown:
        exec(compile(code, "README.md", "exec"), {})
        assert same_output(output, capsys.readouterr().out, rel=1e-3)
