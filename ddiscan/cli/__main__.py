"""``python -m ddiscan.cli``: the ``ddiscan`` command."""

from . import main

main()
