"""Helpers shared by the reader and header tests."""

import pytest

from ddiscan.io.reader import SafetensorsFile

from safetensors_builders import safetensors_accepts


def refused(path, cls, *, key=None, library_refuses=True):
    """``path`` refused with ``cls``, its path (and ``key``) in the message, and refused by
    the safetensors library too unless ``library_refuses`` is False; the message."""
    with pytest.raises(cls) as info:
        SafetensorsFile(path)
    message = str(info.value)
    assert str(path) in message
    if key is not None:
        assert repr(key) in message or key in message
    if library_refuses:
        assert not safetensors_accepts(path)
    return message
