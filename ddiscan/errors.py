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
]


class DdiscanError(Exception):
    """Base of every error ddiscan raises on purpose."""

    exit_code = 1


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
