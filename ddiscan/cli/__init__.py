"""The ``ddiscan`` command: a thin click layer over the library.

Each command calls one library function; every ``DdiscanError`` becomes one line on
stderr and the exit code its class names (set DDISCAN_DEBUG=1 for the traceback). Usage
errors are one line too (exit 2), an interrupt is "Error: interrupted" (exit 130), and any
other exception, a bug, is "Error: internal error: ... (please report)" (exit 70). Every
message and every name printed goes through :func:`ddiscan.errors.printable`. Data goes to
stdout; every "wrote ...", note and warning to stderr.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import click

from .._version import __version__
from ..errors import DdiscanError, printable
from ..io.reader import collecting_inputs

from .audit import audit
from .check import check
from .profile import profile
from .prune import prune
from .report import report

__all__ = ["cli", "main", "FLAGS"]

INTERRUPTED, INTERNAL, BROKEN_PIPE = 130, 70, 141  # 141 = 128 + SIGPIPE, as a shell reports it
# click's own exits, and its help for a bare command (click 8.2+), are not errors
_CLICK_PASSES = tuple(getattr(click.exceptions, name) for name in ("Exit", "Abort", "NoArgsIsHelpError")
                      if hasattr(click.exceptions, name))


def _fail(message: str, code: int):
    click.echo(f"Error: {printable(message)}", err=True)
    sys.exit(code)


@contextmanager
def _one_line_errors():
    """Every failure as one line on stderr and its exit code (the README's table); with
    DDISCAN_DEBUG set, ddiscan's own errors and bugs raise with their traceback."""
    try:
        yield
    except _CLICK_PASSES:
        raise
    except click.ClickException as exc:  # usage errors: click prints four lines, we print one
        _fail(exc.format_message(), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", INTERRUPTED)
    except BrokenPipeError:  # stdout closed early (`ddiscan report ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        sys.exit(BROKEN_PIPE)
    except DdiscanError as exc:
        if os.environ.get("DDISCAN_DEBUG"):
            raise
        _fail(exc.render(FLAGS), exc.exit_code)
    except Exception as exc:  # the last line of defence: a bug, not a way to report bad input
        if os.environ.get("DDISCAN_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (please report)", INTERNAL)


class _Group(click.Group):
    def make_context(self, *args, **kwargs):
        with _one_line_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_errors(), collecting_inputs():  # every file read: no output may replace one
            return super().invoke(ctx)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ddiscan")
def cli():
    """Score LoRA adapters by the Directional Deviation Index (DDI), from the weights alone.

    Exit codes: 0 success, 1 check failed, 2 usage error, 3 bad input, 4 I/O failure,
    70 internal error, 130 interrupted. Set DDISCAN_DEBUG=1 to see the traceback behind an error.
    """


for _command in (report, check, profile, prune, audit):
    cli.add_command(_command)

def _shown(option: click.Option) -> str:
    """``--t``, or ``-o/--output`` for an option with a short form too (aliases left out)."""
    short = [o for o in option.opts if not o.startswith("--")]
    return "/".join([*short[:1], next(o for o in option.opts if o.startswith("--"))])


# how the command line shows each library parameter in a message (an error's ``{name}``):
# as the flag that sets it, for every option of every command
FLAGS = {param.name: _shown(param) for command in cli.commands.values() for param in command.params
         if isinstance(param, click.Option) and any(o.startswith("--") for o in param.opts)}


def main():
    cli(prog_name="ddiscan")
