"""The package's layout keeps its promises: README's "How the pieces fit" names every
module, and every module stays within the limits of issue #15 (no function over 60 lines
or a cyclomatic complexity over 15, measured by radon; no module over 300 lines)."""

import re
from pathlib import Path

import pytest
from radon.complexity import cc_visit
from radon.visitors import Class

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ddiscan"
MODULES = sorted(p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py"))
MAX_COMPLEXITY, MAX_FUNCTION_LINES, MAX_MODULE_LINES = 15, 60, 300


def _pieces_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## How the pieces fit\n", 1)[1]
    return section.split("\n## ", 1)[0]


def _functions(blocks):
    """Every function and method radon measured, closures and nested classes included."""
    for block in blocks:
        if isinstance(block, Class):
            yield from _functions(block.methods)
            yield from _functions(block.inner_classes)
        else:
            yield block
            yield from _functions(block.closures)


def test_the_readme_names_every_module_and_no_module_that_is_gone():
    named = set(re.findall(r"`(ddiscan/[\w/]+\.py)`", _pieces_section()))
    assert [m for m in MODULES if m not in named] == []
    assert sorted(named - set(MODULES)) == []


@pytest.mark.parametrize("module", MODULES)
def test_every_module_is_within_the_limits(module):
    source = (ROOT / module).read_text(encoding="utf-8")
    lines = len(source.splitlines())
    over = [(f.fullname, f.complexity, f.endline - f.lineno + 1) for f in _functions(cc_visit(source))
            if f.complexity > MAX_COMPLEXITY or f.endline - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert (lines <= MAX_MODULE_LINES, over) == (True, []), \
        f"{module}: {lines} lines; (function, complexity, lines) over the limits: {over}"
