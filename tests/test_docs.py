"""The man page and the README cannot drift from the click definitions."""

import re

import pytest
from pathlib import Path

import click

from ddiscan.cli import cli

ROOT = Path(__file__).resolve().parents[1]
MAN = (ROOT / "man" / "ddiscan.1").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _options(command: click.Command) -> set[str]:
    names = set()
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(o for o in param.opts if o.startswith("--"))
    return names - {"--help"}


def _man_options(text: str) -> set[str]:
    return {m.replace("\\-", "-") for m in re.findall(r"\\-\\-[a-z](?:[a-z0-9\\-]*[a-z0-9])?", text)}


def _all_options() -> set[str]:
    return set().union(*(_options(c) for c in cli.commands.values()))


def test_every_option_is_in_the_man_page_and_readme():
    options = _all_options()
    assert {"--t", "--exact", "--top", "--mode"} <= options
    man = _man_options(MAN)
    assert sorted(o for o in options if o not in man) == []
    assert sorted(o for o in options if not re.search(rf"`(-\w, )?{o}\b", README)) == []


def test_man_page_names_no_option_the_code_lacks():
    known = _all_options() | {"--version", "--help"}
    assert sorted(_man_options(MAN) - known) == []


def test_every_command_has_a_man_section():
    for name in cli.commands:
        assert f".SS {name}" in MAN


def test_exit_codes_agree():
    from ddiscan import errors

    codes = {cls.exit_code for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.DdiscanError)}
    for code in codes:
        assert re.search(rf"^\| {code} \|", README, re.M), code
        assert f".B {code}\n" in MAN, code


def test_man_page_renders_without_warnings():
    import shutil
    import subprocess

    groff = shutil.which("groff")
    assert groff, "groff is needed (.ci/run installs groff-base)"
    result = subprocess.run([groff, "-man", "-ww", "-z", str(ROOT / "man" / "ddiscan.1")],
                            capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize("device", ["ascii", "utf8"])
def test_man_page_formulas_read_the_same_on_every_terminal(device):
    """The man page's formulas render as what they say in ASCII and UTF-8 alike (no
    escapes that turn into arrows or drop a symbol)."""
    import shutil
    import subprocess

    groff = shutil.which("groff")
    assert groff, "groff is needed (.ci/run installs groff-base)"
    result = subprocess.run([groff, "-man", f"-T{device}", "-P-cbou", str(ROOT / "man" / "ddiscan.1")],
                            capture_output=True, text=True, env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"})
    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    for formula in ("cosine of C*dW and dW", "dW = s*B*A", "C = A*A^T / ||A||_F"):
        assert formula in text, formula
    assert not set(text) & set("↑⎪")


def test_the_documented_shell_completion_works():
    import os
    import shutil
    import subprocess

    exe = shutil.which("ddiscan")
    assert exe, "the ddiscan console script is installed by pip install -e"
    for shell in ("bash", "zsh", "fish"):
        assert f"_DDISCAN_COMPLETE={shell}_source ddiscan" in README
        out = subprocess.run([exe], env={**os.environ, "_DDISCAN_COMPLETE": f"{shell}_source"},
                             capture_output=True, text=True)
        assert out.returncode == 0 and "_DDISCAN_COMPLETE" in out.stdout, shell
