"""The one way ddiscan reads JSON: bounded in size, depth and number length, one-line errors.

Every JSON ddiscan reads may come from a stranger (``adapter_config.json``, a checkpoint
index, a base's ``config.json``, the diffusers metadata and profile metadata in a
safetensors header, a report given to ``prune --from-report``). :func:`read_json` opens
only a regular file (a FIFO or a device is refused before any read, so nothing blocks and
``/dev/zero`` cannot fill memory) of at most :data:`MAX_JSON_SIZE` bytes;
:func:`parse_json` refuses nesting deeper than :data:`MAX_DEPTH` (checked before
``json.loads``, whose recursion would otherwise fail), integers of more than
:data:`MAX_INT_DIGITS` digits, numbers beyond the float64 range and the ``NaN``/
``Infinity`` constants (JSON has none; ddiscan writes none). Every failure is an
:class:`~ddiscan.errors.InputError` (or the class given) on one line.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat

import numpy as np

from ..errors import DdiscanError, InputError
from .inputs import note_input

__all__ = ["read_json", "parse_json", "MAX_JSON_SIZE", "MAX_DEPTH", "MAX_INT_DIGITS"]

MAX_JSON_SIZE = 100_000_000  # the same bound as a safetensors header (reader.MAX_HEADER_SIZE)
MAX_DEPTH = 64
MAX_INT_DIGITS = 30

# a JSON string, escapes included (unrolled, so it does not backtrack)
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


class _Refused(ValueError):
    """A number or constant parse_json does not accept."""


def _depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text``, brackets inside strings not counted."""
    brackets = _NOT_BRACKETS.sub("", _STRING.sub("", text)).encode("ascii")
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max())


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(digits.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(digits)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is beyond the float64 range")
    return value


def _parse_constant(name: str):
    raise _Refused(f"{name} (not a JSON number)")


def parse_json(text, what: str, source, *, object_pairs_hook=None, error=InputError, non_finite=False):
    """``text`` (str or UTF-8 bytes) parsed as JSON, or ``error`` naming ``source`` and ``what``.

    ``non_finite`` accepts ``NaN``/``Infinity`` and out-of-range numbers (as Python's
    ``json.dumps`` writes a NaN: an adapter config's NaN ``lora_alpha`` is scored as a
    non-finite module, not an error). A :class:`~ddiscan.errors.DdiscanError` raised by
    ``object_pairs_hook`` propagates as is.
    """
    try:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8")
        if not isinstance(text, str):
            raise _Refused(f"expected text, got {type(text).__name__}")
        if len(text) > MAX_JSON_SIZE:
            raise _Refused(f"{len(text)} characters, more than {MAX_JSON_SIZE}")
        depth = _depth(text)
        if depth > MAX_DEPTH:
            raise _Refused(f"nested {depth} deep, more than {MAX_DEPTH}")
        numbers = {} if non_finite else dict(parse_float=_parse_float, parse_constant=_parse_constant)
        return json.loads(text, object_pairs_hook=object_pairs_hook, parse_int=_parse_int, **numbers)
    except DdiscanError:
        raise
    except (ValueError, RecursionError, MemoryError) as exc:  # JSONDecodeError, UnicodeDecodeError, _Refused
        reason = " ".join(str(exc).split())[:200]
        raise error(f"{source}: not valid JSON ({reason}); ddiscan reads it as {what}") from None


def read_json(path, what: str, *, non_finite=False):
    """The JSON value in the regular file ``path`` (at most :data:`MAX_JSON_SIZE` bytes)."""
    try:
        # O_NONBLOCK: opening a FIFO does not wait for a writer; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{path}: {what} is not a regular file")
        if info.st_size > MAX_JSON_SIZE:
            raise InputError(f"{path}: {what} is {info.st_size} bytes, more than {MAX_JSON_SIZE}")
        note_input(path, info)  # an input: no output may replace it
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_JSON_SIZE + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_JSON_SIZE:  # grew since fstat
        raise InputError(f"{path}: {what} is more than {MAX_JSON_SIZE} bytes")
    return parse_json(data, what, path, non_finite=non_finite)
