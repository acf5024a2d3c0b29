"""The errors ddiscan raises, each with the exit code the command line gives it.

Exit codes (the README and the man page carry the same table):

    0  success
    1  a check failed (a module exceeded a limit)
    2  usage error (bad options or option combinations)
    3  bad input (missing, unreadable or malformed file; no LoRA pairs; shape mismatch)
    4  I/O failure while writing an output
"""

__all__ = [
    "DdiscanError",
    "UsageError",
    "InputError",
    "NotSafetensors",
    "PickleRefused",
    "HeaderError",
    "UnsupportedDtype",
    "QuantizedBase",
    "NoLoraPairs",
    "MatchError",
    "ShapeMismatch",
    "OutputError",
    "printable",
]


class DdiscanError(Exception):
    """Base of every error ddiscan raises on purpose.

    A message may name parameters as ``{name}`` (given after it): ``str()`` shows the
    names themselves, :meth:`render` whatever a caller shows for them (the command line:
    its flags), so no library message names a flag.
    """

    exit_code = 1

    def __init__(self, message: str = "", *parameters: str):
        self.template, self.parameters = message, parameters
        super().__init__(self.render({}))

    def render(self, shown: dict[str, str]) -> str:
        if not self.parameters:
            return self.template
        return self.template.format(**{p: shown.get(p, p) for p in self.parameters})


class UsageError(DdiscanError):
    """Options that contradict each other or cannot apply."""

    exit_code = 2


class InputError(DdiscanError):
    """An input file or tensor is missing, unreadable or malformed."""

    exit_code = 3


class NotSafetensors(InputError):
    """The file is not in the safetensors format."""


class PickleRefused(InputError):
    """A pickled checkpoint (.bin/.pt/.pth); ddiscan never unpickles."""


class HeaderError(InputError):
    """A safetensors header breaks the format's rules."""


class UnsupportedDtype(InputError):
    """A tensor's dtype cannot be scored."""


class QuantizedBase(InputError):
    """A quantized base weight that would be misread as plain floats."""


class NoLoraPairs(InputError):
    """The adapter holds no LoRA A/B pair."""


class MatchError(InputError):
    """LoRA keys that match no base weight, or more than one."""


class ShapeMismatch(InputError):
    """LoRA factors whose shapes do not fit each other or the base weight."""


class OutputError(DdiscanError):
    """Writing an output failed."""

    exit_code = 4


def printable(text) -> str:
    """``text`` with every character that is not printable (newlines, carriage returns,
    ANSI escapes, other control and format characters, line separators) written as a
    repr-style escape (``\\n``, ``\\x1b``, ``\\u2028``), so that a name read from a file
    can neither start a line of its own nor drive the terminal. Printable text, spaces
    and non-ASCII letters included, is unchanged."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
