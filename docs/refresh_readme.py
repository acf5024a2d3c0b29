"""Rewrite the outputs README.md shows under its example commands with what ddiscan prints now.

    python docs/refresh_readme.py

tests/test_readme.py fails when a shown output is stale; this brings it up to date.
"""

import os
import re
import shlex
from pathlib import Path

from click.testing import CliRunner

from ddiscan.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def main():
    os.chdir(ROOT)  # the examples name fixtures/ relative to the repository
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")

    def fresh(match):
        result = CliRunner().invoke(cli, shlex.split(match.group(1))[1:], catch_exceptions=False)
        return f"    {match.group(1)}\n\n```text\n{result.stdout}```"

    readme.write_text(re.sub(r"^    (ddiscan [^\n]+)\n\n```text\n(.*?)```", fresh, text, flags=re.M | re.S),
                      encoding="utf-8")


if __name__ == "__main__":
    main()
